"""Official-format 4M assets end to end: an image file -> `fourm-generate` -> PNGs and text.

The directory a user would download is assembled here from the fixtures: the 4M checkpoint
`tiny_swiglu` (rgb@224 pixels -> tok_rgb@224, tok_depth@224, caption) as is, a second tiny 4M
checkpoint written in 4M's format by `ml4m_export` (-> tok_normal@224, tok_semseg@224, det,
tok_dinov2_global), 4M's WordPiece JSON, and tokenizer folders named like the hub releases, each a
4M `config.json` (the fixture's config as template, at the models' vocabularies and a 14x14 grid
at 224 px) with random weights. Random weights give noise; the checks are on the path, the
layouts, the sizes and the errors.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from fourm.compat import ml4m, ml4m_assets
from fourm.compat.ml4m_tokenizers.config import parse_config, register_fixture_archs
from fourm.compat.ml4m_tokenizers import unet
from fourm.compat.ml4m_tokenizers.load import expected_state
from fourm.generate.inputs import needing_tokenizer

REPO = Path(__file__).resolve().parents[1]
ML4M = REPO.parent / "shared" / "fixtures" / "ml4m"
MODEL_A = ML4M / "tiny_swiglu"
TOKS = ML4M / "tokenizers"
WORDPIECE = TOKS / "wordpiece_text" / "text_tokenizer_4m_wordpiece_30k.json"
pytestmark = pytest.mark.skipif(not (MODEL_A / "model.safetensors").is_file() or not WORDPIECE.is_file(),
                                reason=f"4M fixtures not found under {ML4M}")
# The subprocess registers the fixtures' tiny ViT sizes (vit_t_*) as their README says, then runs
# the ordinary console entry point.
RUN = ("import sys; from fourm.compat.ml4m_tokenizers.config import register_fixture_archs; "
       "from fourm.compat.ml4m_tokenizers.unet import register_fixture_unets; register_fixture_archs(); "
       "register_fixture_unets(); from fourm.cli.generate import main; sys.argv[0] = 'fourm-generate'; main()")


def _random_state(cfg, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in expected_state(cfg).items():
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_mlp.weight")) or "layernorms" in k:
            out[k] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[k] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return out


def make_tokenizer(folder: Path, *, codebook: int, n_channels: int = 3, n_labels=None, mlp: bool = False,
                   num_codebooks: int = 1, divae: bool = False, seed: int = 0) -> Path:
    """A 4M tokenizer folder (config.json + model.safetensors) with random weights."""
    register_fixture_archs()
    unet.register_fixture_unets()
    if divae:  # ViT encoder + the fixture's tiny patched UNet decoder
        raw = json.loads((TOKS / "divae_unet_rgb" / "config.json").read_text())
        raw.update(image_size=224, patch_size=16, n_channels=n_channels, codebook_size=codebook)
    elif mlp:
        raw = json.loads((TOKS / "vq_mlp_global" / "config.json").read_text())
        raw.update(codebook_size=codebook, num_codebooks=num_codebooks, n_channels=n_channels)
    else:
        raw = json.loads((TOKS / "vqvae_vit_semseg" / "config.json").read_text())
        raw.update(image_size=224, patch_size=16, n_channels=n_channels if n_labels is None else n_labels,
                   n_labels=n_labels, codebook_size=codebook)
    cfg = parse_config(raw, "DiVAE" if divae else "VQVAE")
    state = _random_state(cfg, seed)
    if divae:
        rng = np.random.default_rng(seed + 100)
        state.update({f"decoder.{k}": (0.2 * rng.standard_normal(shape)).astype(np.float32)
                      for k, shape in unet._expected(unet.unet_arch(raw)).items()})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def make_model_b(folder: Path) -> Path:
    """A tiny 4M checkpoint (4M's file format) with 4M-21 outputs: normals, semseg, det, DINOv2-global."""
    from fourm.compat import ml4m_export
    from fourm.model.fourm_model import FourM
    from fourm.model.pretrained import assign_params, flat_params

    cfg = json.loads((MODEL_A / "config.json").read_text())
    outs = ["tok_normal@224", "tok_semseg@224", "det", "tok_dinov2_global"]
    cfg.update(dim=16, num_heads=2, encoder_depth=1, decoder_depth=1, domains_in=["rgb@224"] + outs,
               domains_out=outs)
    spec = ml4m.spec_from_ml4m(cfg, verbose=False)
    model = nnx.eval_shape(lambda: FourM(spec, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    assign_params(model, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat_params(model).items()})
    ml4m_export.export(model, folder)
    return folder



@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
    """The commands run in-process: keep JAX's persistent cache off, as the other command tests do."""
    monkeypatch.setenv("FOURM_COMPILATION_CACHE", "off")

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml4m_e2e")
    toks = root / "tokenizers"
    toks.mkdir()
    make_tokenizer(toks / "4M_tokenizers_rgb_16k_224-448", codebook=16384, divae=True, seed=1)
    make_tokenizer(toks / "4M_tokenizers_depth_8k_224-448", codebook=8192, n_channels=1, seed=2)
    make_tokenizer(toks / "4M_tokenizers_normal_8k_224-448", codebook=8192, seed=3)
    make_tokenizer(toks / "4M_tokenizers_semseg_4k_224-448", codebook=4096, n_labels=16, seed=4)
    make_tokenizer(toks / "4M_tokenizers_DINOv2-B14-global_8k_16_224", codebook=8192, mlp=True,
                   num_codebooks=16, n_channels=48, seed=5)
    shutil.copy(WORDPIECE, toks / WORDPIECE.name)
    make_model_b(root / "4M-21_tiny")
    rng = np.random.default_rng(0)
    # Not square and not 224: 4M's center crop + resize must happen.
    Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)).save(root / "photo.png")
    return root


def _generate_in_process(args):
    from fourm.cli import generate as cli

    register_fixture_archs()
    unet.register_fixture_unets()
    return cli.main(["fourm-generate", *args])


def _generate(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------------------
# the whole path through the command line
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_image_to_depth_rgb_caption_with_official_layout(assets, tmp_path):
    out = tmp_path / "out_a"
    rc = _generate_in_process(["--checkpoint", str(MODEL_A), "--tokenizers", str(assets / "tokenizers"),
                               "--cond", f"rgb={assets / 'photo.png'}", "--targets",
                               "depth,rgb,caption:max_new_tokens=8", "--out", str(out), "--seed", "3",
                               "--diffusion_steps", "2"])
    assert rc == 0
    depth, rgb = _png(out / "000_tok_depth_224.png"), _png(out / "000_tok_rgb_224.png")
    assert depth.shape == rgb.shape == (224, 224, 3)
    assert depth.std() > 0 and rgb.std() > 0  # a decoded picture, not a constant
    caption = (out / "000_caption.txt").read_text().strip()
    assert caption and "[S_1]" not in caption
    meta = json.loads((out / "generation.json").read_text())
    by_name = {t["name"]: t for t in meta["targets"]}
    # 4M's RGB -> X preset: ROAR, 1 step, temperature 0.01, CFG 2; captions AR at 0.3; top_p 0.8
    assert (by_name["tok_depth@224"]["scheme"], by_name["tok_depth@224"]["steps"],
            by_name["tok_depth@224"]["temperature"], by_name["tok_depth@224"]["guidance_scale"]) == \
        ("roar", 1, 0.01, 2.0)
    assert by_name["caption"]["temperature"] == 0.3 and by_name["caption"]["top_p"] == 0.8
    with np.load(out / "tokens.npz", allow_pickle=False) as z:
        assert z["tok_depth@224"].shape == (1, 14, 14) and z["tok_rgb@224"].shape == (1, 14, 14)
        assert z["tok_depth@224"].max() < 8192 and z["tok_rgb@224"].max() < 16384
    grid = _png(out / "grid.png")
    assert grid.shape[1] >= 3 * 224  # given image + two pictures side by side


@pytest.mark.slow
def test_image_to_normals_semseg_boxes_4m21_layout(assets, tmp_path):
    out = tmp_path / "out_b"
    rc = _generate_in_process(["--checkpoint", str(assets / "4M-21_tiny"), "--tokenizers",
                               str(assets / "tokenizers"), "--cond", f"rgb={assets / 'photo.png'}", "--targets",
                               "normal,semseg,det:max_new_tokens=12:temperature=1.0,tok_dinov2_global",
                               "--out", str(out)])
    assert rc == 0
    normal, semseg = _png(out / "000_tok_normal_224.png"), _png(out / "000_tok_semseg_224.png")
    assert normal.shape == semseg.shape == (224, 224, 3)
    # semseg: one palette colour per class id (16 classes at most)
    assert len(np.unique(semseg.reshape(-1, 3), axis=0)) <= 16
    det = _png(out / "000_det.png")  # boxes drawn on the (cropped, resized) input image
    assert det.shape == (224, 224, 3)
    assert (out / "000_det.txt").is_file()
    # a global feature vector has no picture: the decoded vector is written as .npy
    assert np.load(out / "000_tok_dinov2_global.npy", allow_pickle=False).shape == (48, 1, 1)


# ------------------------------------------------------------------------------------------------
# pieces: preprocessing, conventions, folder mapping, presets
# ------------------------------------------------------------------------------------------------
def test_read_image_center_crops_and_resizes_as_4m(assets, tmp_path):
    img = ml4m_assets.read_image(assets / "photo.png", 224)
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    src = Image.open(assets / "photo.png")  # 300 x 260: crop 20 columns each side, then resize
    want = np.asarray(src.crop((20, 0, 280, 260)).resize((224, 224), Image.BICUBIC))
    np.testing.assert_array_equal(img, want)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ml4m_assets.AssetError, match=r"grey\.png: expected an RGB image.*mode L"):
        ml4m_assets.read_image(tmp_path / "grey.png", 224)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ml4m_assets.AssetError, match=r"broken\.png: cannot read the image"):
        ml4m_assets.read_image(tmp_path / "broken.png", 224)


def test_truncated_standardisation_matches_4m_definition():
    d = np.random.default_rng(0).uniform(1, 10, (16, 16)).astype(np.float32)
    flat = np.sort(d.reshape(-1))
    kept = flat[25:230]  # int(0.1 * 256) .. int(0.9 * 256)
    want = (d - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)
    np.testing.assert_allclose(ml4m_assets.truncated_standardise(d), want, rtol=1e-5, atol=1e-5)
    # invariant to the unit (what makes a PNG's depth scale irrelevant)
    np.testing.assert_allclose(ml4m_assets.truncated_standardise(d * 1000), want, rtol=1e-3, atol=1e-3)


def test_rgb_tokenizer_input_convention(assets):
    spec = ml4m.load(MODEL_A).spec
    toks = ml4m_assets.load_tokenizers(assets / "tokenizers", spec, ["tok_rgb@224", "tok_depth@224"],
                                       diffusion_steps=1)
    rgb = toks["tok_rgb@224"]
    assert rgb.tok.cfg.cls == "DiVAE" and toks["tok_depth@224"].tok.cfg.cls == "VQVAE"
    x = np.full((1, 224, 224, 3), 255, np.uint8)
    np.testing.assert_allclose(rgb.to_input(x), 1.0)  # x * 2 - 1 (undo_std false)
    np.testing.assert_allclose(rgb.to_input(np.zeros((1, 224, 224, 3), np.float32)), -1.0)
    tokens = rgb.encode(x)
    assert tokens.shape == (1, 14, 14) and tokens.dtype == np.int32
    dec = rgb.decode(tokens)
    assert dec.shape == (1, 224, 224, 3) and 0 <= dec.min() and dec.max() <= 1
    depth = toks["tok_depth@224"]
    assert depth.decode(depth.encode(np.random.default_rng(0).uniform(1, 5, (2, 224, 224)))).shape == (2, 224, 224)


def test_tokenizer_folder_errors_name_folder_and_modality(assets, tmp_path):
    spec = ml4m.load(MODEL_A).spec
    root = tmp_path / "toks"
    root.mkdir()
    with pytest.raises(ml4m_assets.AssetError, match=r"no tokenizer folder for 'tok_depth@224'.*4M_tokenizers_depth_"):
        ml4m_assets.load_tokenizers(root, spec, ["tok_depth@224"])
    make_tokenizer(root / "4M_tokenizers_depth_4k_224", codebook=4096, n_channels=1)
    with pytest.raises(ml4m_assets.AssetError, match=r"4M_tokenizers_depth_4k_224: tokenizer vocabulary 4096"
                       r".*'tok_depth@224' has vocabulary 8192"):
        ml4m_assets.load_tokenizers(root, spec, ["tok_depth@224"])
    with pytest.raises(ml4m_assets.AssetError, match=r"no text_tokenizer\*\.json.*'caption'"):
        ml4m_assets.load_tokenizers(root, spec, ["caption"])
    # tokenizers.json names folders explicitly, and may not leave the folder
    make_tokenizer(root / "my_depth", codebook=8192, n_channels=1)
    (root / "tokenizers.json").write_text(json.dumps({"depth": "my_depth"}))
    assert ml4m_assets.load_tokenizers(root, spec, ["tok_depth@224"])["tok_depth@224"].folder.name == "my_depth"
    make_tokenizer(root / "4M_tokenizers_depth_8k_224", codebook=8192, n_channels=1)
    (root / "tokenizers.json").unlink()
    with pytest.raises(ml4m_assets.AssetError, match=r"several tokenizer folders for 'tok_depth@224'"):
        ml4m_assets.load_tokenizers(root, spec, ["tok_depth@224"])
    (root / "tokenizers.json").write_text(json.dumps({"tok_depth@224": "../elsewhere"}))
    with pytest.raises(ml4m_assets.AssetError,
                       match=r"tokenizers\.json: entry 'tok_depth@224' = '\.\./elsewhere' leaves"):
        ml4m_assets.load_tokenizers(root, spec, ["tok_depth@224"])


def test_presets_are_4ms_settings():
    spec = ml4m.load(MODEL_A).spec
    d, r, c = (spec.modality(n) for n in ("tok_depth@224", "tok_rgb@224", "caption"))
    assert ml4m_assets.preset_settings("rgb2x", d) == dict(
        scheme="roar", steps=1, token_schedule="linear", temperature=0.01, temperature_schedule="constant",
        guidance_scale=2.0, top_p=0.8, top_k=0)
    assert ml4m_assets.preset_settings("x2rgb", r)["steps"] == 25
    assert ml4m_assets.preset_settings("x2rgb", r)["temperature_schedule"] == "onex:0.5:0.5"
    assert ml4m_assets.preset_settings("maskgit8", d)["token_schedule"] == "cosine"
    clip = ml4m_assets.preset_settings("x2rgb", ml4m.modreg.get("tok_clip@224", "ml4m"))
    assert (clip["steps"], clip["temperature"], clip["guidance_scale"]) == (50, 5.0, 3.0)
    assert ml4m_assets.preset_settings("rgb2x", c)["temperature"] == 0.3
    assert ml4m_assets.auto_preset(["rgb@224"]) == "rgb2x" and ml4m_assets.auto_preset(["caption"]) == "x2rgb"
    with pytest.raises(ml4m_assets.AssetError, match="unknown preset 'fast'"):
        ml4m_assets.preset_settings("fast", d)


def test_cli_errors_are_one_line_and_write_nothing(assets, tmp_path):
    out = tmp_path / "never"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "grey.png")
    r = _generate(["--checkpoint", str(MODEL_A), "--tokenizers", str(assets / "tokenizers"),
                   "--cond", f"rgb={tmp_path / 'grey.png'}", "--targets", "depth", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 2 and not out.exists()
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fourm-generate: error:") and "grey.png: expected an RGB image" in last


def test_cli_missing_tokenizer_folder_for_a_target(assets, tmp_path, capsys):
    toks = tmp_path / "toks"
    toks.mkdir()
    shutil.copy(WORDPIECE, toks / WORDPIECE.name)
    out = tmp_path / "never"
    rc = _generate_in_process(["--checkpoint", str(MODEL_A), "--tokenizers", str(toks), "--cond",
                               f"rgb={assets / 'photo.png'}", "--targets", "caption,depth", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists() and len(err) == 1
    assert "no tokenizer folder for 'tok_depth@224'" in err[0] and "4M_tokenizers_depth_" in err[0]


def test_det_text_is_drawn_on_the_image_in_4m_coordinates():
    from fourm.cli import generate as cli
    from fourm.modalities import get

    base = np.zeros((100, 200, 3), np.uint8)
    text = "v0=250 v1=100 v2=750 v3=900 dog [EOS]"  # x 0.25..0.75, y 0.1..0.9 of the image
    pic = cli.picture(get("det", "ml4m"), None, None, rgb=base, text=text, ml4m=True)
    assert pic.shape == base.shape
    drawn = np.argwhere(pic.any(-1))
    assert abs(drawn[:, 1].min() - 50) <= 1 and abs(drawn[:, 1].max() - 150) <= 1  # x0 = 0.25 * 200
    assert drawn[:, 0].max() <= 91  # y1 = 0.9 * 100 (the label sits above y0)
    assert not cli.picture(get("det", "ml4m"), None, None, rgb=base, text="no boxes here", ml4m=True).any()


def test_native_grid_conditions_go_through_their_tokenizer(assets):
    from fourm.generate.chain import Generator

    model = ml4m.load(MODEL_A)
    toks = ml4m_assets.load_tokenizers(assets / "tokenizers", model.spec, ["tok_depth@224", "tok_rgb@224"],
                                       diffusion_steps=1)
    gen = Generator(model, toks)
    depth = np.random.default_rng(3).uniform(1, 5, (200, 200)).astype(np.float32)  # one map, not 224
    image = ml4m_assets.read_image(assets / "photo.png", 224)
    notices = []
    states, batch = gen.prepare({"tok_depth@224": depth, "tok_rgb@224": image}, None, notices)
    assert batch == 1 and states["tok_depth@224"].ids.shape == (1, 196) and states["tok_depth@224"].known.all()
    resized = toks["tok_depth@224"].resize(depth[None], 224)
    np.testing.assert_array_equal(states["tok_depth@224"].ids, toks["tok_depth@224"].encode(resized).reshape(1, -1))
    np.testing.assert_array_equal(states["tok_rgb@224"].ids, toks["tok_rgb@224"].encode(image[None]).reshape(1, -1))
    assert any("resized to 224x224" in n for n in notices)
    assert needing_tokenizer(model.spec, {"tok_depth@224": depth, "caption": "a dog",
                                          "tok_rgb@224": np.zeros((14, 14), np.int32)}) == \
        ["tok_depth@224", "caption"]


@pytest.mark.slow
def test_folder_of_images_with_a_4m_checkpoint(assets, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(240, 320), (300, 200), (224, 224)]):  # 4M's crop + resize evens them out
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    out = tmp_path / "out"
    rc = _generate_in_process(["--checkpoint", str(MODEL_A), "--tokenizers", str(assets / "tokenizers"),
                               "--cond", f"rgb={photos}", "--targets", "depth", "--images_per_call", "2",
                               "--out", str(out)])
    assert rc == 0
    index = json.loads((out / "images.json").read_text())
    assert [e["folder"] for e in index] == ["batch_000", "batch_000", "batch_001"]
    assert _png(out / "batch_001" / "000_tok_depth_224.png").shape == (224, 224, 3)
