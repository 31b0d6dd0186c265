"""The bad-input battery: every command, given a wrong flag, file or value, exits non-zero with one
line `fourm-x: error: ...` that names it, writes nothing, and prints no traceback; `--help` of
every command prints its docstring and flags and exits 0.

Commands run in-process through their console entry (`main(argv)` returns the exit status), on
tiny inputs; the checks fire before any model is trained or data generated."""

import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED

ML4M_FIXTURE = SHARED / "fixtures" / "ml4m" / "tiny_swiglu"
COMMANDS = {  # console script -> (module, entry function), as in pyproject.toml
    "fourm-quickstart": ("quickstart", "main"), "fourm-scenes": ("scenes", "main"),
    "fourm-train-tokenizer": ("train_tokenizer", "main"),
    "fourm-eval-tokenizer": ("eval_tokenizer", "main"),
    "fourm-export-tokenizer": ("export_tokenizer", "main"),
    "fourm-train-text-tokenizer": ("train_text_tokenizer", "main"),
    "fourm-pretokenize": ("pretokenize", "main"), "fourm-train": ("train", "main"),
    "fourm-aot": ("aot", "main"), "fourm-generate": ("generate", "main"),
    "fourm-generate-eval": ("generate", "eval_main"), "fourm-ml4m": ("ml4m", "main"),
    "fourm-bench": ("bench", "main"), "fourm-features": ("features", "main"),
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Commands set process-wide things (JAX_PLATFORMS, cache env, log levels): restore them."""
    saved = dict(os.environ)
    monkeypatch.setenv("FOURM_COMPILATION_CACHE", "off")
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_cli(prog, *args):
    module, fn = COMMANDS[prog]
    return getattr(importlib.import_module(f"fourm.cli.{module}"), fn)([prog, *map(str, args)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fourm.model.pretrained import save_pretrained
    from test_generate_chain import small_model

    root = tmp_path_factory.mktemp("bad_input")
    save_pretrained(small_model(), None, root / "ckpt")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "photo.png")
    Image.fromarray(img).save(root / "photo.bmp")
    np.savez(root / "arrays.npz", x=np.zeros((64, 64), np.float32))
    np.save(root / "nan_rgb.npy", np.full((64, 64, 3), np.nan, np.float32))
    np.save(root / "nan_depth.npy", np.full((64, 64), np.nan, np.float32))
    (root / "caption.txt").write_text("a red cube\n")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("x")
    (root / "no_manifest").mkdir()
    return root


def _fmt(args, files, tmp):
    return [str(a).format(f=files, tmp=tmp, fix=ML4M_FIXTURE) for a in args]


def _check(capsys, rc, want_rc, pattern, prog):
    err = capsys.readouterr().err
    assert rc == want_rc, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, err[-3000:]  # one line, naming the problem
    assert "Traceback" not in err
    import re
    assert re.search(pattern, errors[0]), errors[0]


GEN = ["--checkpoint", "{f}/ckpt", "--targets"]  # the small random model of the generation tests
# (command, arguments, exit status, regex the one error line must match)
CASES = [
    ("fourm-quickstart", ["--config.num_devices=0"], 2, r"--config.num_devices: got 0, expected a positive integer"),
    # ---- data: fourm-scenes
    ("fourm-scenes", ["--num", "-3"], 2, r"--num \(config.num\): got -3, expected a positive integer"),
    ("fourm-scenes", ["--num", "0"], 2, r"--num \(config.num\): got 0"),
    ("fourm-scenes", ["--resolution", "0"], 2, r"--resolution .*got 0"),
    ("fourm-scenes", ["--workers", "-1"], 2, r"--workers .*got -1, expected a non-negative"),
    ("fourm-scenes", ["show", "/nonexistent"], 2, r"show /nonexistent: no such folder"),
    ("fourm-scenes", ["validate", "/nonexistent"], 2, r"validate /nonexistent: no such folder"),
    ("fourm-scenes", ["show", "a", "b"], 2, r"usage: fourm-scenes"),
    ("fourm-scenes", ["--depth_format", "bmp"], 2, r"depth_format.*npy.*png16"),
    ("fourm-scenes", ["--depth-format=bmp"], 2, r"depth_format.*npy.*png16"),
    ("fourm-scenes", ["--config.nmu=3"], 2, r"unknown config key 'nmu'; did you mean --config.num\?"),
    ("fourm-scenes", ["--config.num=abc"], 2, r"--config.num=abc"),
    ("fourm-scenes", ["--frobnicate"], 2, r"frobnicate"),
    # ---- configs
    ("fourm-train", ["--config", "nosuchconfig"], 2, r"config file .*nosuchconfig.py not found"),
    ("fourm-train", ["--config.optim.lrr=1"], 2, r"unknown config key 'optim.lrr'; did you mean --config.optim.lr\?"),
    ("fourm-train", ["--config.nosuchkey=1"], 2, r"unknown config key 'nosuchkey'; did you mean"),
    ("fourm-pretokenize", ["--config.image_tokenizers.tok_dpth@64=x"], 2,
     r"unknown config key 'image_tokenizers.tok_dpth@64'; did you mean --config.image_tokenizers.tok_depth@64"),
    ("fourm-train", ["--config.num_train_steps=abc"], 2, r"--config.num_train_steps=abc"),
    ("fourm-bench", ["--iters", "0"], 2, r"--iters \(config.iters\): got 0"),
    ("fourm-bench", ["--only", "model,nosuch"], 2, r"nosuch"),
    # ---- training: checked before any data is read or device touched
    ("fourm-train", ["--config", "pretrain:smoke", "--config.num_train_steps=0"], 2,
     r"config.num_train_steps=0: expected an integer >= 1"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.num_train_steps=-5"], 2,
     r"config.num_train_steps=-5"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.optim.lr=nan"], 2,
     r"config.optim.lr=nan: expected a positive finite number"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.optim.lr=-1e-3"], 2, r"config.optim.lr=-0.001"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.batch_size=0"], 2, r"config.batch_size=0"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.batch_size=-2"], 2, r"config.batch_size=-2"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.grad_accum=3"], 2,
     r"batch_size=16 is not divisible by config.grad_accum=3"),
    ("fourm-train", ["--config", "pretrain:smoke"], 2, r"config.data.dir is empty"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.data.dir=/no/such/data"], 2,
     r"config.data.dir='/no/such/data': no such directory"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.data.dir={f}/no_manifest"], 2,
     r"no manifest.json there"),
    ("fourm-train", ["--config", "pretrain:smoke", "--config.nonfinite=ignore"], 2,
     r"config.nonfinite='ignore': expected 'stop' or 'skip'"),
    ("fourm-train", ["extra"], 2, r"unexpected arguments"),
    # ---- tokenizers
    ("fourm-train-tokenizer", ["--steps", "-1"], 2, r"--steps: got -1"),
    ("fourm-train-tokenizer", ["--config.train.lr=nan"], 2, r"--config.train.lr=nan"),
    ("fourm-train-tokenizer", ["--config.train.batch_size=0"], 2, r"--config.train.batch_size: got 0"),
    ("fourm-export-tokenizer", ["/no/such/run", "{tmp}/out"], 2, r"CKPT /no/such/run: no such folder"),
    ("fourm-export-tokenizer", ["{f}/existing", "{f}/existing"], 2, r"OUT_DIR .*existing exists; pass --overwrite"),
    ("fourm-export-tokenizer", ["only_one"], 2, r"usage: fourm-export-tokenizer"),
    ("fourm-eval-tokenizer", ["/no/such/run"], 2, r"/no/such/run: no such folder"),
    ("fourm-eval-tokenizer", ["{f}/existing", "--num", "0"], 2, r"--num: got 0"),
    ("fourm-pretokenize", ["--config.image_tokenizers.tok_depth@64=/no/such/tok"], 2,
     r"--config.image_tokenizers.tok_depth@64 /no/such/tok: no such folder"),
    ("fourm-pretokenize", ["--config.shard_size=0"], 2, r"--config.shard_size: got 0"),
    ("fourm-train-text-tokenizer", ["--config.text_files=/no/such.txt", "--config.scenes.count=0"], 2,
     r"--config.text_files: /no/such.txt does not exist"),
    ("fourm-train-text-tokenizer", ["--config.scenes.count=0"], 2, r"no training text"),
    ("fourm-train-text-tokenizer", ["--config.vocab_size=0"], 2, r"--config.vocab_size: got 0"),
    # ---- generation
    ("fourm-generate", ["--targets", "depth"], 2, r"--checkpoint is required"),
    ("fourm-generate", ["--checkpoint", "{f}/ckpt"], 2, r"--targets is required"),
    ("fourm-generate", ["--checkpoint", "/no/ckpt", "--targets", "depth"], 2, r"--checkpoint /no/ckpt: no such folder"),
    ("fourm-generate", [*GEN, "depth", "--batch", "0"], 2, r"--batch: got 0"),
    ("fourm-generate", [*GEN, "depth", "--batch", "-2"], 2, r"--batch: got -2"),
    ("fourm-generate", [*GEN, "depth", "--cond", "rgb=/no/photo.png"], 2,
     r"--cond rgb=/no/photo.png: no such file"),
    ("fourm-generate", [*GEN, "depth", "--cond", "caption=/no/such.txt"], 2,
     r"--cond caption=/no/such.txt: no such file"),
    ("fourm-generate", [*GEN, "depth", "--cond", "rgb"], 2,
     r"--cond 'rgb': expected NAME=VALUE"),
    ("fourm-generate", [*GEN, "depth", "--cond", "rgb={f}/arrays.npz"], 2,
     r"--cond rgb@64=.*arrays.npz: unsupported file type .npz; expected one of .png"),
    ("fourm-generate", [*GEN, "depth", "--cond", "rgb={f}/caption.txt"], 2,
     r"a .txt file is text; rgb@64 expects an image"),
    ("fourm-generate", [*GEN, "depth", "--cond", "rgb={f}/nan_rgb.npy"], 2,
     r"--cond rgb@64=.*nan_rgb.npy: 12288 NaN/Inf values; expected a finite image"),
    ("fourm-generate", [*GEN, "caption", "--cond", "depth={f}/nan_depth.npy"], 2,
     r"--cond tok_depth@64=.*nan_depth.npy: every value is NaN/Inf"),
    ("fourm-generate", [*GEN, "boxes"], 2,
     r"--targets: this model has no target modality 'boxes'; its targets are \['tok_depth@64', 'caption'\]"),
    ("fourm-generate", [*GEN, "depth:steps=abc"], 2,
     r"--targets 'depth:steps=abc': steps='abc' is not a valid int"),
    ("fourm-generate", [*GEN, "depth:steps=0"], 2, r"steps=0, expected a positive"),
    ("fourm-generate", [*GEN, "depth:bogus=1"], 2, r"option 'bogus=1' is not key=value"),
    ("fourm-generate", [*GEN, "depth:top_p=2"], 2, r"top_p=2.0, expected a value in \(0, 1\]"),
    ("fourm-generate", [*GEN, "depth:temperature=nan"], 2, r"temperature='nan', expected a finite"),
    ("fourm-generate", [*GEN, "depth", "--tokenizers", "/no/toks"], 2,
     r"--tokenizers /no/toks: no such folder"),
    ("fourm-generate-eval", [], 2, r"--checkpoint is required"),
    # ---- conversion
    ("fourm-ml4m", ["convert", "{fix}", "{f}/existing"], 2, r"OUT_DIR .*existing exists and is not empty; pass --overwrite"),
    ("fourm-ml4m", ["convert", "/no/such/4m", "{tmp}/out"], 2, r"/no/such/4m"),
    ("fourm-ml4m", ["frobnicate"], 2, r"usage: fourm-ml4m convert"),
    ("fourm-ml4m", ["check", "/no/such/fixture"], 2, r"/no/such/fixture"),
    ("fourm-ml4m", ["--tol", "nan", "check", "{fix}"], 2, r"--tol=nan: expected a non-negative number"),
]


@pytest.mark.parametrize("prog,args,rc,pattern", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input(prog, args, rc, pattern, files, tmp_path, capsys, monkeypatch):
    if "{fix}" in " ".join(args) and not (ML4M_FIXTURE / "model.safetensors").is_file():
        pytest.skip(f"4M fixture not found at {ML4M_FIXTURE}")
    monkeypatch.chdir(tmp_path)  # default output folders (data/, runs/) would land here
    before = sorted(Path(files).rglob("*"))
    _check(capsys, run_cli(prog, *_fmt(args, files, tmp_path)), rc, pattern, prog)
    assert list(tmp_path.iterdir()) == [], "an error must write nothing"
    assert sorted(Path(files).rglob("*")) == before


def test_battery_is_broad():
    groups = {p for p, *_ in CASES}
    assert len(CASES) >= 40 and len(groups) >= 10


def test_ml4m_convert_refuses_nan_weights(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    if not (ML4M_FIXTURE / "model.safetensors").is_file():
        pytest.skip(f"4M fixture not found at {ML4M_FIXTURE}")
    src = tmp_path / "src"
    shutil.copytree(ML4M_FIXTURE, src)
    tensors = load_file(src / "model.safetensors")
    with safe_open(src / "model.safetensors", "numpy") as f:
        meta = f.metadata()
    name = next(k for k, v in tensors.items() if "mlp" in k and v.dtype.kind == "f")
    tensors[name] = tensors[name].copy()
    tensors[name].flat[:3] = np.nan
    save_file(tensors, src / "model.safetensors", meta)
    rc = run_cli("fourm-ml4m", "convert", src, tmp_path / "out")
    _check(capsys, rc, 2, r"has 3 non-finite \(NaN/Inf\) values", "fourm-ml4m")
    assert not (tmp_path / "out").exists()


def test_tokenizer_of_another_modality_is_refused(tmp_path, capsys, monkeypatch):
    """Same vocabulary size, other modality: refused by name before any shard is written (the
    loader is stubbed: the check under test is the name, not the weights)."""
    import fourm.tokenizers.export as export

    class Tok:
        name, vocab_size = "tok_rgb@64", 1024

    monkeypatch.setattr(export, "load", lambda path: Tok())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rgb_tok").mkdir()
    rc = run_cli("fourm-pretokenize", f"--config.image_tokenizers.tok_depth@64={tmp_path / 'rgb_tok'}",
                 f"--config.out_dir={tmp_path / 'out'}")
    _check(capsys, rc, 2, r"is the tokenizer of 'tok_rgb@64', not of 'tok_depth@64'", "fourm-pretokenize")
    assert not (tmp_path / "out").exists()


def test_all_nan_image_is_not_tokenized():
    from flax import nnx

    from fourm.config import load_config
    from fourm.tokenizers.image import WEIGHTS, ImageTokenizer, build_model

    cfg = load_config(str(Path(__file__).parents[1] / "tokenizers" / "depth.py") + ":64,tiny")
    cfg.model.num_res_blocks = 0
    _, model = build_model(cfg)
    tok = ImageTokenizer(cfg, nnx.split(model, WEIGHTS, ...)[1], chunk_size=2)
    depth = np.full((2, 64, 64), 2.0, np.float32)
    depth[1] = np.nan
    with pytest.raises(ValueError, match="image 1 of the batch has no valid pixel"):
        tok.encode(depth)


def test_batch_must_split_over_devices(tmp_path):
    from fourm.config import load_config
    from fourm.train.validate import ConfigError, check_config

    (tmp_path / "manifest.json").write_text("{}")
    cfg = load_config("pretrain:smoke", ["batch_size=12", f"data.dir={tmp_path}"])
    check_config(cfg, num_devices=4)  # 12 splits over 4 data-parallel devices
    with pytest.raises(ConfigError, match=r"batch_size=12 .* not divisible by the data-parallel size 8"):
        check_config(cfg, num_devices=8)


def test_help_of_every_command(capsys):
    for prog in COMMANDS:
        assert run_cli(prog, "--help") == 0, prog
        out = capsys.readouterr().out
        doc_head = "fourm-generate" if prog == "fourm-generate-eval" else prog
        assert f"`{doc_head}" in out.splitlines()[0], (prog, out[:200])  # the docstring
        assert "--verbosity" in out and "--compilation_cache" in out
        if prog not in ("fourm-export-tokenizer", "fourm-features"):
            assert "--config:" in out and "config fields" in out, prog


def test_quiet_by_default_and_verbose_on_request():
    import logging

    from fourm.cli import normalize_argv, setup_logging

    setup_logging(-1)
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("fourm.train").getEffectiveLevel() == logging.INFO  # progress stays
    assert normalize_argv(["p", "-v"]) == ["p", "--verbosity=0"]
    setup_logging(0)
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.INFO
    setup_logging(-1)


def test_platform_and_compilation_cache(monkeypatch, tmp_path):
    from fourm import runtime

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(runtime, "has_accelerator", lambda: False)
    runtime.choose_platform()
    assert os.environ["JAX_PLATFORMS"] == "cpu"  # no libtpu probing on a CPU machine
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(runtime.CACHE_ENV)
    assert runtime.cache_dir() == tmp_path / "fourm" / "jax_cache"
    assert runtime.cache_dir("off") is None
    assert runtime.cache_dir(str(tmp_path / "c")) == tmp_path / "c"


def test_compile_time_is_measured():
    import jax

    from fourm.runtime import CompileTimer

    with CompileTimer() as ct:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    assert ct.seconds > 0
    seen = ct.seconds
    jax.jit(lambda x: x - 2)(np.arange(5.0))  # after the block: not counted
    assert ct.seconds == seen


def test_generate_tokenizer_folder_of_another_modality(files, tmp_path, capsys, monkeypatch):
    """A folder named for one modality holding another's tokenizer, or two tokenizers of one
    modality: refused by name (loader stubbed: the check under test is the naming)."""
    import fourm.tokenizers as toks

    class Tok:
        def __init__(self, name):
            self.name, self.vocab_size = name, 64

    monkeypatch.setattr(toks, "load", lambda path: Tok(json.loads((Path(path) / "t.json").read_text())))
    for folder, name in (("tok_depth@64", "tok_rgb@64"),):
        (tmp_path / "toks" / folder).mkdir(parents=True)
        (tmp_path / "toks" / folder / "t.json").write_text(json.dumps(name))
    out = tmp_path / "out"
    args = ["--checkpoint", files / "ckpt", "--targets", "depth", "--tokenizers", tmp_path / "toks",
            "--out", out]
    _check(capsys, run_cli("fourm-generate", *args), 2,
           r"toks/tok_depth@64 holds the tokenizer of 'tok_rgb@64', not of 'tok_depth@64'", "fourm-generate")
    shutil.rmtree(tmp_path / "toks")
    for folder in ("a", "b"):
        (tmp_path / "toks" / folder).mkdir(parents=True)
        (tmp_path / "toks" / folder / "t.json").write_text(json.dumps("tok_depth@64"))
    _check(capsys, run_cli("fourm-generate", *args), 2,
           r"toks/a and .*toks/b are both tokenizers of 'tok_depth@64'; keep one", "fourm-generate")
    assert not out.exists()


def test_condition_files_of_every_image_format(files):
    """.bmp (and the other PIL formats) are read as images, not reported as missing."""
    from fourm.cli.generate import read_condition
    from fourm.modalities import get

    rgb = get("rgb@64")
    png = read_condition(rgb, str(files / "photo.png"), 64)
    np.testing.assert_array_equal(read_condition(rgb, str(files / "photo.bmp"), 64), png)
    assert read_condition(get("caption"), str(files / "caption.txt"), 64) == "a red cube"
    assert read_condition(get("caption"), "a red cube left of a blue sphere", 64).startswith("a red")
