"""Encoder features (4M's FMViT) and retrieval by predicted global embeddings, on the official
4M fixture and on a tiny 4M-21-style checkpoint in 4M's format (see test_ml4m_e2e)."""

import json

import numpy as np
import pytest
from PIL import Image

from fourm import backbone, features
from fourm.cli import features as features_cli
from fourm.compat import ml4m, ml4m_assets, ml4m_text
from fourm.compat.ml4m_tokenizers.config import register_fixture_archs
from fourm.generate.chain import Generator
from fourm.generate.inputs import GenerationInputError
from fourm.model.pretrained import read_safetensors
from test_ml4m_e2e import MODEL_A, WORDPIECE, make_model_b, make_tokenizer

pytestmark = pytest.mark.skipif(not (MODEL_A / "model.safetensors").is_file() or not WORDPIECE.is_file(),
                                reason="4M fixtures not found")



@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
    """The commands run in-process: keep JAX's persistent cache off, as the other command tests do."""
    monkeypatch.setenv("FOURM_COMPILATION_CACHE", "off")

@pytest.fixture(scope="module")
def model_a():
    return ml4m.load(MODEL_A)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    make_model_b(root / "4M-21_tiny")
    make_tokenizer(root / "toks" / "4M_tokenizers_DINOv2-B14-global_8k_16_224", codebook=8192, mlp=True,
                   num_codebooks=16, n_channels=48, seed=5)
    rng = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(root / f"g{i}.png")
    return root


def _fmvit_numpy(state, pixels):
    """4M's FourMViT forward (fm_vit.py) in float64 numpy from the 4M state dict: patches (ph, pw, c)
    -> proj + pos_emb + mod_emb -> pre-norm blocks (bias-free LayerNorm, SwiGLU) -> encoder_norm."""
    def ln(x, w):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-6) * w

    b = pixels.shape[0]
    p = pixels.reshape(b, 14, 16, 14, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 196, 768)
    g = {k: v.astype(np.float64) for k, v in state.items()}
    x = p @ g["encoder_embeddings.rgb@224.proj.weight"].T + g["encoder_embeddings.rgb@224.pos_emb"] \
        + g["encoder_embeddings.rgb@224.mod_emb"]
    heads, hd = 4, 12
    for i in range(2):
        e = f"encoder.{i}."
        h = ln(x, g[e + "norm1.weight"])
        qkv = (h @ g[e + "attn.qkv.weight"].T).reshape(b, 196, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, 196, 48) @ g[e + "attn.proj.weight"].T
        h = ln(x, g[e + "norm2.weight"])
        f1, f3 = h @ g[e + "mlp.fc1.weight"].T, h @ g[e + "mlp.fc3.weight"].T
        x = x + (f1 / (1 + np.exp(-f1)) * f3) @ g[e + "mlp.fc2.weight"].T
    return ln(x, g["encoder_norm.weight"])


def test_rgb_features_are_4ms_fmvit(model_a):
    img = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    f = features.encoder_features(model_a, {"rgb@224": img})
    assert f.tokens.shape == (2, 196, 48) and f.pooled.shape == (2, 48)
    assert features.slices(model_a.spec, f) == {"rgb@224": (0, 196)}
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    state, _ = read_safetensors(MODEL_A / "model.safetensors")
    want = _fmvit_numpy(state, (img / 255.0 - mean) / std)
    np.testing.assert_allclose(f.tokens, want, atol=2e-4)
    np.testing.assert_allclose(f.pooled, want.mean(1), atol=2e-4)
    # the same as fourm.backbone's encode_features (pixels / token ids only)
    np.testing.assert_allclose(f.tokens, backbone.encode_features(model_a, {"rgb@224": img}).tokens, atol=1e-5)


def test_more_inputs_join_the_encoder_sequence(model_a):
    img = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    text = ml4m_text.ML4MTextTokenizer.load(WORDPIECE)
    f = features.encoder_features(model_a, {"rgb@224": img, "caption": "a red cube on a table"}, {"text": text})
    sl = features.slices(model_a.spec, f)
    a, b = sl["caption"]  # the model's modality order: caption, then rgb@224
    assert (a, b) == (0, 16) and sl["rgb@224"] == (16, 212)  # one bucket of text slots
    n_words = len(text.encode("a red cube on a table")) + 1  # + [EOS]
    assert f.valid[0, a:b].sum() == n_words and f.of(model_a.spec, "caption").shape == (1, 16, 48)
    alone = features.encoder_features(model_a, {"rgb@224": img})
    assert np.abs(f.of(model_a.spec, "rgb@224") - alone.tokens).max() > 1e-4  # the caption changes rgb
    with pytest.raises(GenerationInputError, match="unknown condition modality .tok_normal@224."):
        features.encoder_features(model_a, {"tok_normal@224": np.zeros((1, 14, 14), np.int32)})


def test_retrieve_ranks_by_cosine():
    gallery = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]])
    idx, score = features.retrieve(np.array([[0.9, 1.0, 0.0]]), gallery, k=2)
    assert idx.tolist() == [[2, 1]] and score[0, 0] == pytest.approx(1.9 / np.sqrt(2 * 1.81))
    with pytest.raises(ValueError, match="expected query"):
        features.retrieve(np.zeros((1, 2)), gallery)


def test_retrieval_by_predicted_dinov2_global(world):
    register_fixture_archs()
    model = ml4m.load(world / "4M-21_tiny")
    toks = ml4m_assets.load_tokenizers(world / "toks", model.spec, ["tok_dinov2_global"])
    gen = Generator(model, toks)
    imgs = np.stack([ml4m_assets.read_image(world / f"g{i}.png", 224) for i in range(3)])
    g = features.predicted_global(gen, {"rgb@224": imgs}, "dinov2_global")
    assert g.shape == (3, 48) and np.isfinite(g).all()
    q = features.predicted_global(gen, {"rgb@224": imgs[1:2]}, "dinov2_global")
    idx, score = features.retrieve(q, g, k=3)
    assert idx[0, 0] == 1 and score[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_cli_features_and_retrieval(world, model_a, tmp_path):
    register_fixture_archs()
    imgs = [str(world / f"g{i}.png") for i in range(3)]
    out = tmp_path / "f.npz"
    assert features_cli.main(["fourm-features", "--checkpoint", str(MODEL_A), *sum([["--image", p] for p in imgs], []),
                              "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as z:
        assert z["tokens"].shape == (3, 196, 48) and z["pooled"].shape == (3, 48)
        assert z["slice/rgb@224"].tolist() == [0, 196] and z["images"].tolist() == imgs
    ret = tmp_path / "ret"
    assert features_cli.main(["fourm-features", "--checkpoint", str(world / "4M-21_tiny"), "--tokenizers",
                              str(world / "toks"), "--global_embedding", "dinov2_global",
                              *sum([["--image", p] for p in imgs], []), "--query", imgs[2], "--top", "2",
                              "--out", str(ret)]) == 0
    res = json.loads((ret / "retrieval.json").read_text())
    assert res[0]["query"] == imgs[2] and res[0]["results"][0]["image"] == imgs[2]
    assert len(res[0]["results"]) == 2
    with np.load(ret / "features.npz", allow_pickle=False) as z:
        assert z["global"].shape == (3, 48)


def test_cli_retrieval_without_global_output_is_a_clear_error(world, tmp_path, capsys):
    out = tmp_path / "never"
    rc = features_cli.main(["fourm-features", "--checkpoint", str(MODEL_A), "--tokenizers", str(world / "toks"),
                            "--global_embedding", "dinov2_global", "--image", str(world / "g0.png"),
                            "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists() and len(err) == 1
    assert "does not predict 'tok_dinov2_global'" in err[0] and "4M-21" in err[0]


def test_cli_features_of_a_fourm_checkpoint(tmp_path):
    from fourm.model.pretrained import save_pretrained
    from test_generate_chain import small_model

    save_pretrained(small_model(), None, tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64), (80, 50)]):  # the second is resized to the model's 64
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "f.npz"
    assert features_cli.main(["fourm-features", "--checkpoint", str(tmp_path / "ckpt"), "--image",
                              str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"), "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as z:
        n = z["slice/rgb@64"][1] - z["slice/rgb@64"][0]
        assert z["tokens"].shape == (2, n, 32) and z["valid"].all()
        np.testing.assert_allclose(z["pooled"], z["tokens"].mean(1), atol=1e-5)
