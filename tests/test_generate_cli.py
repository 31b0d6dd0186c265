"""`fourm-generate` pieces end to end (checkpoint + tokenizer folders -> PNG/txt/grid outputs) and
the scene evaluation (metrics, baselines, caption parser) on a small random model."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fourm.generate.chain import GenerationInputError, Generator, Target
from fourm.generate import evaluate as ev
from test_generate_chain import CAPTION, DEPTH, FAST, small_model

CORPUS = ["A small red cube stands to the left of a large blue sphere.",
          "Two green cylinders and one yellow cone on a grey floor.",
          "Three objects: a pink cone, a cyan cube and a red cylinder."] * 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fourm.model.pretrained import save_pretrained
    from fourm.tokenizers.text import TextTokenizer

    root = tmp_path_factory.mktemp("gen_cli")
    save_pretrained(small_model(), None, root / "ckpt")
    TextTokenizer.train(CORPUS, root / "toks" / "text", dict(vocab_size=1024))
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "photo.png")
    return root


def test_cli_pieces_write_pictures_text_and_grid(files):
    from fourm.cli import generate as cli
    from fourm.config import load_config

    cfg = load_config("generate")
    model = cli.load_model(str(files / "ckpt"))
    toks = cli.load_tokenizers(str(files / "toks"))
    assert set(toks) == {"text"}
    spec = model.spec
    assert cli.resolve_name(spec, "rgb", "condition") == "rgb@64"
    assert cli.resolve_name(spec, "depth", "target") == "tok_depth@64"
    with pytest.raises(GenerationInputError, match="no target modality 'normals'"):
        cli.resolve_name(spec, "normals", "target")
    cond = {"rgb@64": cli.read_condition(spec.modality("rgb@64"), str(files / "photo.png"), 64),
            "caption": cli.read_condition(spec.modality("caption"), "a red cube [S_1]", 64)}
    t = cli.parse_target(spec, "depth:steps=3:temperature=1.0:temperature_schedule=constant", cfg)
    assert (t.name, t.steps, t.temperature, t.scheme, t.top_p) == (DEPTH.name, 3, 1.0, "maskgit", None)
    # fourm's defaults: one step when RGB is a condition, MaskGIT-8 otherwise; options still win
    assert cli.parse_target(spec, "depth", cfg, rgb_given=True).steps == 1
    assert cli.parse_target(spec, "depth", cfg).steps == 8
    assert cli.parse_target(spec, "depth:steps=3", cfg, rgb_given=True).steps == 3
    cap = cli.parse_target(spec, "caption:temperature=0:max_new_tokens=6", cfg)
    assert (cap.name, cap.max_new_tokens, cap.temperature) == ("caption", 6, 0.0)
    with pytest.raises(Exception, match="not key=value"):
        cli.parse_target(spec, "depth:bogus=1", cfg)
    gen = Generator(model, toks, loop="scan", compiler_options=FAST)
    out = gen.generate(cond, [t, cap], seed=0, batch_size=2)
    assert len(out.text["caption"]) == 2 and all(s.startswith("a red cube") for s in out.text["caption"])
    cli.write_outputs(files / "out", gen, cond, [t, cap], out, 64)
    names = sorted(p.name for p in (files / "out").iterdir())
    assert {"grid.png", "tokens.npz", "generation.json", "000_tok_depth_64.png",
            "001_caption.txt"} <= set(names)
    grid = np.asarray(Image.open(files / "out" / "grid.png"))
    assert grid.ndim == 3 and grid.shape[0] > 128
    meta = json.loads((files / "out" / "generation.json").read_text())
    assert meta["conditions"] == ["caption", "rgb@64"]
    with np.load(files / "out" / "tokens.npz", allow_pickle=False) as z:
        assert z["tok_depth@64"].shape == (2, 8, 8)


def test_cli_help_and_missing_checkpoint():
    r = subprocess.run([sys.executable, "-m", "fourm.cli.generate", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--targets" in r.stdout and "--checkpoint" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fourm.cli.generate", "--targets", "depth"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--checkpoint is required" in r.stderr


class PatchDepthTokenizer:
    """Stand-in depth tokenizer: one token per 8x8 patch = its mean log-depth in 64 bins."""

    kind = "grid"  # fourm.tokenizer_protocol

    name, grid, vocab_size, lo, hi = "tok_depth@64", (8, 8), 64, np.log(0.3), np.log(12.0)

    def encode(self, depth):
        d = np.log(np.asarray(depth, np.float64)).reshape(-1, 8, 8, 8, 8).mean((2, 4))
        return np.clip(np.round((d - self.lo) / (self.hi - self.lo) * 63), 0, 63).astype(np.int32)

    def decode(self, tokens):
        d = np.exp(self.lo + np.asarray(tokens, np.float64) / 63 * (self.hi - self.lo))
        return np.repeat(np.repeat(d, 8, axis=1), 8, axis=2).astype(np.float32)


def test_scene_evaluation_figures(files):
    from fourm.tokenizers.text import TextTokenizer

    gen = Generator(small_model(), {"tok_depth@64": PatchDepthTokenizer(),
                                    "text": TextTokenizer.load(files / "toks" / "text")}, loop="scan",
                    compiler_options=FAST)
    fig = ev.evaluate_scenes(gen, seed=0, start=1_000_000, num=4, batch_size=2, train_scenes=12,
                             grid_target=DEPTH, caption_target=CAPTION, progress=False)
    for k in ("depth_rmse", "depth_rmse_mean_map_baseline", "depth_rmse_tokenizer_roundtrip",
              "caption_count_accuracy", "caption_colour_precision"):
        assert np.isfinite(fig[k]), k
    assert fig["depth_rmse_tokenizer_roundtrip"] < fig["depth_rmse_mean_map_baseline"]
    assert fig["parser_count_accuracy"] == 1.0  # the parser reads every true caption right
    text = ev.format_figures(fig)
    assert "depth RMSE" in text and "captions: object count right" in text


def test_caption_parsing():
    assert ev.parse_count("Two red cubes and a blue sphere on a grey floor.") == 3
    assert ev.parse_count("Four objects in front of a white wall: a cube left of a cone, ...") == 4
    assert ev.parse_count("A red cube is left of a blue ball, with three more objects nearby.") == 5
    assert ev.parse_count("Two red cubes on a floor. The red cube is left of the red cube.") == 2
    assert ev.parse_count("An empty room with a grey floor and cream walls.") == 0
    assert ev.parse_count("a floor") is None
    assert ev.parse_colours("A red cube in a room with light blue walls.") == {"red"}
    assert ev.parse_colours("Pale green walls, dark grey floor, a blue cone.") == {"blue"}
    np.testing.assert_allclose(ev.angular_error_deg(np.array([[0.0, 0, 1]]), np.array([[0.0, 1, 0]])), [90.0])
    with pytest.raises(ValueError, match="no rgb@32 input"):
        ev.evaluate_scenes(Generator(small_model()), num=1, resolution=32, train_scenes=1)


def test_target_scheme_errors():
    gen = Generator(small_model())
    with pytest.raises(GenerationInputError, match="scheme 'maskgit' not supported"):
        gen.generate({"caption": "x"}, [Target("caption", scheme="maskgit")])
    with pytest.raises(GenerationInputError, match="scheme 'autoregressive' not supported"):
        gen.generate({"caption": "x"}, [Target("tok_depth@64", scheme="autoregressive")])


def test_folder_condition_batches_images_like_single_runs(files, tmp_path, capsys):
    """--cond rgb=DIR/: images run `images_per_call` at a time; greedy tokens of each image equal
    a run on that image alone; images.json maps files to outputs; samples/s is printed."""
    import dataclasses

    from fourm.cli import CommandError
    from fourm.cli import generate as cli

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(folder / f"img{i}.png")
    (folder / "notes.md").write_text("not an image")  # ignored
    paths = cli.folder_files("rgb=DIR", folder)
    assert [p.name for p in paths] == ["img0.png", "img1.png", "img2.png"]
    gen = Generator(small_model(), loop="auto", buckets=2, compiler_options=FAST)
    greedy = dataclasses.replace(DEPTH, temperature=0.0)
    sizes, generate = [], gen.generate
    gen.generate = lambda cond, *a, **k: sizes.append(len(cond["rgb@64"])) or generate(cond, *a, **k)
    assert cli.run_folder(gen, {}, "rgb@64", paths, [greedy], 0, 2, tmp_path / "out", 64) == 0
    assert sizes == [2, 2]  # the last, short call is padded to the first call's batch
    del gen.generate
    index = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(e["folder"], e["sample"]) for e in index] == [("batch_000", 0), ("batch_000", 1),
                                                            ("batch_001", 0)]
    assert "generated 3 images in 2 calls of up to 2" in capsys.readouterr().out
    with np.load(tmp_path / "out" / "batch_001" / "tokens.npz", allow_pickle=False) as z:
        last = z["tok_depth@64"]
    alone = gen.generate({"rgb@64": imgs[2]}, [greedy], seed=0).tokens["tok_depth@64"]
    np.testing.assert_array_equal(last, alone)
    # Generation.first: every batch axis cut, the per-step trace's too (steps come first there).
    full = gen.generate({"rgb@64": imgs}, [greedy, CAPTION], seed=0, return_trace=True)
    two = full.first(2)
    tr, tr2 = full.trace["tok_depth@64"], two.trace["tok_depth@64"]
    assert two.tokens["tok_depth@64"].shape[0] == 2 and tr2["decode_step"].shape[0] == 2
    np.testing.assert_array_equal(tr2["step_ids"], tr["step_ids"][:, :2])
    assert tr2["num_tokens_per_step"].shape == (2, tr["num_tokens_per_step"].shape[1])
    cap, cap2 = full.trace["caption"], two.trace["caption"]  # sequences: batch-first throughout
    np.testing.assert_array_equal(cap2["step_logp"], cap["step_logp"][:2])
    assert len(cap2["merged"]) == 2 and two.tokens["caption"].shape[0] == 2
    Image.fromarray(imgs[0][:32]).save(folder / "img3.png")
    with pytest.raises(CommandError, match="img3.png is \\[32, 64, 3\\]"):
        cli.read_folder_chunk(small_model().spec.modality("rgb@64"), cli.folder_files("x", folder), 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CommandError, match="no images"):
        cli.folder_files("rgb=empty", empty)


def test_only_needed_tokenizers_are_loaded(files, tmp_path, monkeypatch):
    """fourm-generate loads the image tokenizers its conditions and targets use; the others are
    named from their config.json (folder-name and duplicate checks still see them)."""
    import shutil

    from fourm.bench.tokenizer import random_image_tokenizer
    from fourm.cli import generate as cli
    from fourm.tokenizers import export as export_lib

    root = tmp_path / "toks"
    shutil.copytree(files / "toks", root)
    for recipe in ("depth", "normals"):
        export_lib.export(random_image_tokenizer(recipe, 64, tiny=True), root / recipe, platforms=("cpu",))
    assert export_lib.peek_name(root / "depth") == "tok_depth@64"
    assert export_lib.peek_name(root / "text") is None
    loaded = []
    real = cli.load_image_tokenizer
    monkeypatch.setattr(cli, "load_image_tokenizer", lambda p: loaded.append(p.name) or real(p))
    toks = cli.load_tokenizers(str(root), {"tok_depth@64", "caption"})
    assert set(toks) == {"text", "tok_depth@64"} and loaded == ["depth"]
    assert set(cli.load_tokenizers(str(root))) == {"text", "tok_depth@64", "tok_normal@64"}
    shutil.copytree(root / "normals", root / "normals_copy")  # a duplicate is found unloaded too
    with pytest.raises(cli.CommandError, match="both tokenizers of 'tok_normal@64'"):
        cli.load_tokenizers(str(root), {"tok_depth@64"})
    shutil.rmtree(root / "normals_copy")
    shutil.copytree(root / "normals", root / "tok_depth@64")  # a folder named for another one
    with pytest.raises(cli.CommandError, match="holds the tokenizer of 'tok_normal@64'"):
        cli.load_tokenizers(str(root), {"caption"})
