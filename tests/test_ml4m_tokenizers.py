"""4M's tokenizers in JAX: parity with the reference fixtures (through `fourm-ml4m check-tokenizer`),
every config variant the reference takes (shapes and self-consistency on random weights), and the
bad-input errors (one line, naming the key / tensor / file / value)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fourm.cli import ml4m as ml4m_cli
from fourm.compat.ml4m_check import FixtureError
from fourm.compat.ml4m_tokenizers import check as tok_check
from fourm.compat.ml4m_tokenizers import load as tload
from fourm.compat.ml4m_tokenizers.config import (TokenizerConfigError, ViTArch, parse_config, parse_mlp,
                                                 register_fixture_archs, register_vit)
from fourm.compat.ml4m_tokenizers.vit import bicubic_matrix
from fourm.model.pretrained import write_safetensors

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "ml4m" / "tokenizers"
SEMSEG, MLP_GLOBAL, DIVAE = FIXTURES / "vqvae_vit_semseg", FIXTURES / "vq_mlp_global", FIXTURES / "divae_unet_rgb"
pytestmark = pytest.mark.skipif(not (SEMSEG / "model.safetensors").is_file(),
                                reason=f"4M tokenizer fixtures not found at {FIXTURES}")

register_fixture_archs()
if tload.unet is not None:  # DiVAE's UNet sizes of the fixtures (fourm.compat.ml4m_tokenizers.unet)
    tload.unet.register_fixture_unets()


def _last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", [SEMSEG, MLP_GLOBAL], ids=lambda p: p.name)
def test_check_tokenizer_command_passes_on_vqvae_fixtures(fixture, capsys):
    assert ml4m_cli.main(["fourm-ml4m", "check-tokenizer", str(fixture)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("PASS: 4 matched, 0 failed")
    for name in ("tokens", "quant", "quant_from_tokens", "decoded"):
        assert any(line.split()[1:2] == [name] and " ok" in line for line in out.splitlines()), name


def test_divae_tokens_and_quant_match_and_decoded_is_never_faked():
    rows = {r.name: r for r in tok_check.run_check(DIVAE)}
    assert rows["tokens"].ok and rows["tokens"].value == "0 mismatches"
    assert rows["quant"].ok and float(rows["quant"].value) <= 1e-4
    assert rows["quant_from_tokens"].ok
    assert rows["decoded"].ok, rows["decoded"]


def test_check_fails_when_the_reference_disagrees(tmp_path, capsys):
    """The check is able to fail: one flipped token and a perturbed decoded array."""
    fx = tmp_path / "fx"
    shutil.copytree(SEMSEG, fx)
    z = dict(np.load(fx / "fixture.npz"))
    z["tokens"][0, 0, 0] = (z["tokens"][0, 0, 0] + 1) % 128
    z["decoded"] = z["decoded"] + 1e-3
    np.savez(fx / "fixture.npz", **z)
    assert ml4m_cli.main(["fourm-ml4m", "check-tokenizer", str(fx)]) == 1
    last = _last_line(capsys)
    assert last.startswith("FAIL") and "tokens" in last and "decoded" in last


# ---------------------------------------------------------------------------------------------
# every variant the reference constructs: shapes and self-consistency on random weights
# ---------------------------------------------------------------------------------------------


def _variant(**over):
    raw = json.loads((SEMSEG / "config.json").read_text())
    raw.update(over)
    return raw


def _random_tokenizer(raw, cls=None, seed=0):
    cfg = parse_config(raw, cls)
    rng = np.random.default_rng(seed)
    state = {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in tload.expected_state(cfg).items()}
    return tload.Tokenizer(cfg, state, name="variant")


VARIANTS = {
    "no_post_mlp_rgb": dict(post_mlp=False, n_labels=None, n_channels=3),
    "euclidean_norm_latents": dict(norm_codes=False, norm_latents=True),
    "lucid_3_codebooks": dict(num_codebooks=3),
    "memcodes_4_heads_vit": dict(quant_type="memcodes", num_codebooks=4),
    "out_conv_patch_dec_4": dict(out_conv=True, patch_size_dec=4, image_size_dec=16),
    "enc_trained_at_64": dict(image_size_enc=64),  # stored 8x8 pos grid, bicubic to the 4x4 input
    "feature_map_no_patch_proj": dict(patch_proj=False, n_labels=None, n_channels=24, patch_size=8),
    "undo_std_rgb": dict(undo_std=True, n_labels=None, n_channels=3),
    "standard_mlp": dict(enc_type="MLP/B_3-Wi_32", dec_type="MLP/B_2-Wi_48", n_labels=None, n_channels=24),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_runs_and_is_self_consistent(name):
    raw = _variant(**VARIANTS[name])
    tok = _random_tokenizer(raw)
    c = tok.cfg
    b = 2
    if c.n_labels is not None:
        x = np.random.default_rng(1).integers(0, c.n_labels, (b, 32, 32))
    elif not c.patch_proj and c.enc_vit:
        x = np.random.default_rng(1).standard_normal((b, c.n_channels, 4, 4)).astype(np.float32)
    else:
        x = np.random.default_rng(1).standard_normal((b, c.n_channels, 32, 32)).astype(np.float32)
    quant, tokens = tok.encode(x)
    grid = (4, 4) if c.enc_vit else x.shape[2:]
    assert tokens.shape == ((b, *grid) if c.num_codebooks == 1 else (b, c.num_codebooks, *grid))
    assert quant.shape == (b, c.latent_dim, *grid)
    assert 0 <= tokens.min() and tokens.max() < c.codebook_size
    np.testing.assert_allclose(tok.tokens_to_embedding(tokens), quant, atol=1e-5)
    dec = tok.decode_tokens(tokens)
    if c.dec_vit:
        ps = c.dec_patch_size if c.patch_proj else 1
        assert dec.shape == (b, c.out_channels, 4 * ps, 4 * ps)
    else:
        assert dec.shape == (b, c.out_channels, *grid)
    assert np.isfinite(dec).all()


def test_variants_change_the_computation():
    """Switching a key really changes what is computed (same weights where shared)."""
    base = _random_tokenizer(_variant(), seed=3)
    x = np.random.default_rng(0).integers(0, 16, (2, 32, 32))
    cos_tokens = base.tokenize(x)
    eucl = tload.Tokenizer(parse_config(_variant(norm_codes=False)), base.state, name="e")
    assert (eucl.tokenize(x) != cos_tokens).any()


def test_bicubic_position_resize_matches_torch_rules():
    np.testing.assert_array_equal(bicubic_matrix(5, 5), np.eye(5, dtype=np.float32))
    for n_in, n_out in ((16, 14), (14, 16), (4, 8), (8, 3)):
        m = bicubic_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # the kernel's weights sum to one
    # 4 -> 8 (scale 0.5): output 2 samples source x = 0.75, i.e. t = 0.75 between inputs 0 and 1,
    # Keys kernel A=-0.75: weights for inputs -1,0,1,2 (input -1 clamped onto 0).
    a, t = -0.75, 0.75
    c1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
    c2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
    want = np.array([c2(t + 1) + c1(t), c1(1 - t), c2(2 - t), 0.0])
    np.testing.assert_allclose(bicubic_matrix(4, 8)[2], want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the architecture table and MLP ids
# ---------------------------------------------------------------------------------------------


def test_architecture_table():
    assert parse_config(_variant(enc_type="vit_b_enc", dec_type="vit_l_dec")).enc_arch == ViTArch(768, 12, 12)
    assert parse_mlp("BottleneckMLP/B_6-Wi_1024").expansion == 4
    assert parse_mlp("BottleneckMLP/B_2-Wi_64-Exp_2") == parse_mlp("BottleneckMLP/B_2-Wi_64-E_2")
    with pytest.raises(TokenizerConfigError, match=r"enc_type='vit_x_enc' is not a known ViT encoder"):
        parse_config(_variant(enc_type="vit_x_enc"))
    with pytest.raises(TokenizerConfigError, match=r"dec_type='vit_t_enc'"):
        parse_config(_variant(dec_type="vit_t_enc"))
    with pytest.raises(TokenizerConfigError, match="not a 4M MLP id"):
        parse_config(_variant(enc_type="BottleneckMLP/B_x-Wi_64"))
    with pytest.raises(ValueError, match="already registered"):
        register_vit("vit_t_enc", ViTArch(32, 1, 1))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def _folder(tmp_path, src=SEMSEG, config=None, weights=None):
    d = tmp_path / "tok"
    d.mkdir()
    raw = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config(raw) if config else raw))
    if weights is None:
        shutil.copy(src / "model.safetensors", d / "model.safetensors")
    else:
        weights(d / "model.safetensors", tload.read_weights(src / "model.safetensors"))
    return d


def _one_line_error(tmp_path, match, **kw):
    d = _folder(tmp_path, **kw)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(TokenizerConfigError, match=match) as e:
        tload.load(d)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written


def test_unknown_config_key(tmp_path):
    _one_line_error(tmp_path, r"unknown key\(s\) \['n_label'\] for a 4M VQVAE",
                    config=lambda r: {**r, "n_label": 3})


def test_missing_config_key(tmp_path):
    _one_line_error(tmp_path, r"missing key\(s\) \['latent_dim'\]",
                    config=lambda r: {k: v for k, v in r.items() if k != "latent_dim"})


def test_bad_config_value(tmp_path):
    _one_line_error(tmp_path, r"quant_type='fsq' is not one of", config=lambda r: {**r, "quant_type": "fsq"})
    shutil.rmtree(tmp_path / "tok")
    _one_line_error(tmp_path, r"patch_size must be int, got '8'", config=lambda r: {**r, "patch_size": "8"})


def test_unknown_class(tmp_path):
    _one_line_error(tmp_path, r"VQControlNet tokenizer.*not supported",
                    config=lambda r: {**r, "sd_path": "runwayml/stable-diffusion-v1-5"})
    with pytest.raises(TokenizerConfigError, match=r"unknown 4M tokenizer class 'VQGAN'"):
        tload.load(SEMSEG, cls="VQGAN")
    shutil.rmtree(tmp_path / "tok")
    _one_line_error(tmp_path, r"model_type='VQControlNet' is not a supported 4M tokenizer class",
                    config=lambda r: {**r, "model_type": "VQControlNet"})
    assert parse_config(_variant(model_type="VQVAE", domain="semseg_coco")).cls == "VQVAE"
    with pytest.raises(TokenizerConfigError, match="contradicts the requested class 'DiVAE'"):
        parse_config(_variant(model_type="VQVAE"), "DiVAE")


def test_wrong_shape_weight(tmp_path):
    def weights(path, t):
        t["quant_proj.weight"] = np.zeros((31, 64, 1, 1), np.float32)
        write_safetensors(path, t)

    _one_line_error(tmp_path, r"quant_proj.weight has shape \[31, 64, 1, 1\], expected \[32, 64, 1, 1\]",
                    weights=weights)


def test_missing_and_unexpected_weights(tmp_path):
    def weights(path, t):
        t["encoder.extra"] = t.pop("encoder.norm_mlp.bias")
        write_safetensors(path, t)

    _one_line_error(tmp_path, r"missing tensor\(s\) \['encoder.norm_mlp.bias'\]; unexpected tensor\(s\) "
                              r"\['encoder.extra'\]", weights=weights)


def test_uninitialised_codebook(tmp_path):
    def weights(path, t):
        t["quantize._codebook.initted"] = np.zeros(1, np.float32)
        write_safetensors(path, t)

    _one_line_error(tmp_path, r"quantize._codebook.initted is 0", weights=weights)


def test_truncated_safetensors(tmp_path):
    def weights(path, t):
        data = (SEMSEG / "model.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])

    _one_line_error(tmp_path, r"model.safetensors: cannot read safetensors file", weights=weights)


@pytest.fixture(scope="module")
def semseg():
    return tload.load(SEMSEG)


@pytest.fixture(scope="module")
def mlp_global():
    return tload.load(MLP_GLOBAL)


def test_wrong_image_size_channels_and_values(semseg, mlp_global):
    ids = np.zeros((1, 32, 32), np.int64)
    with pytest.raises(ValueError, match=r"multiples of the patch size 8, got int64\[1, 30, 32\]"):
        semseg.tokenize(ids[:, :30])
    with pytest.raises(ValueError, match=r"expected class ids int\[B, H, W\].*got float32\[1, 3, 32, 32\]"):
        semseg.tokenize(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 16\), got min 0, max 16"):
        semseg.tokenize(ids + 16 * (np.arange(32) == 5)[None, None])
    with pytest.raises(ValueError, match=r"expected float\[B, 48, H, W\].*got float32\[2, 47, 1, 1\]"):
        mlp_global.tokenize(np.zeros((2, 47, 1, 1), np.float32))


def test_token_ids_out_of_range_and_shape(semseg, mlp_global):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\), got min -1"):
        semseg.decode_tokens(np.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\), got min 64, max 64"):
        mlp_global.decode_tokens(np.full((1, 4, 1, 1), 64))
    with pytest.raises(ValueError, match=r"expected token ids int\[B, 4, h, w\], got int64\[1, 1, 1\]"):
        mlp_global.decode_tokens(np.zeros((1, 1, 1), np.int64))


def test_check_command_errors_are_one_line(tmp_path, capsys):
    assert ml4m_cli.main(["fourm-ml4m", "check-tokenizer", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fourm-ml4m: error:") and "no such fixture folder" in err and "\n" not in err
    fx = tmp_path / "fx"
    shutil.copytree(SEMSEG, fx)
    (fx / "fixture.npz").unlink()
    with pytest.raises(FixtureError, match=r"fixture.npz: no such file"):
        tok_check.run_check(fx)


# ---------------------------------------------------------------------------------------------
# export through fourm's tokenizer artifact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", [SEMSEG, MLP_GLOBAL], ids=lambda p: p.name)
def test_export_round_trips_tokens(fixture, tmp_path):
    import jax

    from fourm.tokenizers import load as load_any
    from fourm.tokenizers.export import export

    z = np.load(fixture / "fixture.npz")
    tok = load_any(fixture)  # the raw 4M folder loads through fourm.tokenizers.load too
    assert isinstance(tok, tload.Tokenizer)
    out = export(tok, tmp_path / "art", platforms=("cpu",))
    spec = json.loads((out / "config.json").read_text())
    assert spec["format"] == "fourm.image_tokenizer" and spec["family"] == "ml4m"
    back = load_any(out)
    assert isinstance(back, tload.Tokenizer) and back.version == spec["version"]
    np.testing.assert_array_equal(back.tokenize(z["inputs"]), z["tokens"])
    # The serialized functions alone (jax + numpy), as a user of the artifact calls them.
    w = dict(np.load(out / "weights.npz", allow_pickle=False))
    enc = jax.export.deserialize((out / "encode.jaxexport").read_bytes())
    dec = jax.export.deserialize((out / "decode.jaxexport").read_bytes())
    x = z["inputs"].astype(np.int32 if back.cfg.n_labels is not None else np.float32)
    tokens = np.asarray(enc.call(w, x))
    np.testing.assert_array_equal(tokens, z["tokens"])
    np.testing.assert_allclose(np.asarray(dec.call(w, tokens)), z["decoded"], atol=1e-4)


def test_export_refuses_divae_and_writes_nothing(tmp_path):
    from fourm.tokenizers.export import export

    with pytest.raises(ValueError, match="only 4M VQVAE tokenizers export; a DiVAE decodes by diffusion"):
        export(tload.load(DIVAE), tmp_path / "art", platforms=("cpu",))
    assert list(tmp_path.iterdir()) == []


def test_bench_vit_vqvae_encode_runs_at_the_tiny_size():
    """The fourm-bench group at its quick size (the fixtures' tiny ViT, 32 px): figures exist."""
    from fourm.bench import suite
    from fourm.config import load_config

    c = load_config("bench:quick")
    c.iters = 1
    (r,) = suite.run_group("ml4m_tokenizer", c)
    assert r.name == "ml4m_tokenizer.vit_t_enc@32.encode" and r.unit == "images/s"
    assert r.seconds > 0 and r.throughput > 0 and r.extra["grid"] == [4, 4] and r.peak_rss > 0
    assert r.flops is None or r.flops > 2 * 2 * 16 * 192 * 64  # at least the patch projection
    assert load_config("bench").ml4m_tokenizer.enc_type == "vit_b_enc"  # the released size by default


def test_divae_decode_tokens_through_the_tokenizer():
    z = np.load(DIVAE / "fixture.npz")
    tok = tload.load(DIVAE)
    out = tok.decode_tokens(z["tokens"], noise=z["noise"], timesteps=4, mode="trailing")
    np.testing.assert_allclose(out, z["decoded"], atol=1e-4)
    with pytest.raises(ValueError, match="pass noise="):
        tok.decode_tokens(z["tokens"], timesteps=4)


def test_check_tokenizer_dispatches_text_fixtures(capsys):
    text = FIXTURES / "wordpiece_text"
    assert ml4m_cli.main(["fourm-ml4m", "check-tokenizer", str(text)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("PASS")
    assert "case 19 caption_with_coords_inline/decode/skip_special_true" in out
