"""Tokenizer training run -> checkpoint (resume) -> export -> use without fourm; and the errors
for artifacts or configs that contradict each other."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fourm.tokenizers import load
from fourm.tokenizers.export import export, load_export
from fourm.tokenizers.image import ImageTokenizer
from fourm.tokenizers.runs import from_run
from fourm.tokenizers.recipes import base_config
from fourm.tokenizers.train import train

REPO = Path(__file__).resolve().parents[1]


def _depth_config(tmp: Path):
    cfg = base_config("depth", "tok_depth", dict(kind="depth", min_depth=0.5, max_depth=20.0,
                                                 ssi_weight=0.5), "64,tiny")
    cfg.model.num_res_blocks = 0
    # num_images == eval_num: the preview PNGs and the final eval share one compiled shape.
    cfg.train.update(batch_size=8, steps=2, ckpt_every=1, image_every=2, num_images=8)
    cfg.data.update(train_num=16, eval_num=8, cache_dir=str(tmp / "cache"))
    cfg.workdir = str(tmp / "run")
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    cfg = _depth_config(tmp)
    train(cfg, evaluate_at_end=False)
    return tmp, cfg


def test_train_writes_run_and_resumes(run):
    tmp, cfg = run
    wd = Path(cfg.workdir)
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert (wd / "images" / "step_000002.png").exists()
    assert list((wd / "tb").iterdir())
    first = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [1, 2]
    # Resume: a longer run continues from step 2 instead of starting over.
    out = train(_depth_config(tmp), steps=3)
    lines = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert lines[:2] == first
    assert out["eval"]["step"] == 3 and 0 < out["eval"]["abs_rel"] < 10
    assert out["eval"]["codebook_usage_pct"] > 0


def test_checkpoint_config_contradiction_is_an_error(run):
    tmp, cfg = run
    other = _depth_config(tmp)
    other.quantizer.codebook_size = 128
    with pytest.raises(ValueError, match=r"quantizer.codebook_size: checkpoint has 64, config has 128"):
        from_run(cfg.workdir, config=other)
    with pytest.raises(ValueError, match="contradicts the run"):
        train(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 99"):
        from_run(cfg.workdir, step=99)


def _cli(*args, cwd=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(run):
    """`fourm-export-tokenizer RUN/checkpoints/2 OUT` (the command line, in a subprocess)."""
    tmp, cfg = run
    out = tmp / "export" / "tok_depth@64"
    proc = _cli("fourm.cli.export_tokenizer", str(Path(cfg.workdir) / "checkpoints" / "2"), str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported tok_depth@64 step 2" in proc.stdout
    proc = _cli("fourm.cli.export_tokenizer", cfg.workdir, str(out))  # no silent overwrite
    assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr
    return out


def test_export_round_trip_in_fourm(run, exported):
    _, cfg = run
    spec = json.loads((exported / "config.json").read_text())
    for key in ("modality", "resolution", "grid", "vocab_size", "normalisation", "version",
                "format_version", "config_hash"):
        assert key in spec, key
    assert spec["modality"] == "depth" and spec["grid"] == [8, 8] and spec["step"] == 2
    assert spec["normalisation"]["kind"] == "log_depth_fixed_range"
    tok = load(exported)
    ref = from_run(cfg.workdir, step=2)
    assert tok.version == ref.version and tok.config_hash == ref.config_hash
    d = np.random.default_rng(0).uniform(1, 9, (3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(tok.encode(d), ref.encode(d))
    assert load(cfg.workdir).step in (2, 3)  # a training run directory loads too


def test_export_works_without_fourm(run, exported, tmp_path):
    """A clean interpreter that cannot import fourm tokenizes and detokenizes with jax + numpy."""
    tok = load(exported)
    d = np.random.default_rng(1).uniform(1, 9, (3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", d)
    np.save(tmp_path / "tokens.npy", tok.encode(d))
    np.save(tmp_path / "recon.npy", tok.decode(tok.encode(d)))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fourm" or name.startswith("fourm."):
                    raise ImportError("fourm is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import fourm  # noqa
            raise SystemExit("fourm was importable")
        except ImportError:
            pass
        import json, numpy as np, jax
        d = {str(exported)!r}
        spec = json.load(open(d + "/config.json"))
        w = dict(np.load(d + "/weights.npz", allow_pickle=False))
        enc = jax.export.deserialize(open(d + "/encode.jaxexport", "rb").read())
        dec = jax.export.deserialize(open(d + "/decode.jaxexport", "rb").read())
        x = np.load("x.npy")
        t = np.asarray(enc.call(w, x))
        assert t.shape == (3, *spec["grid"]) and t.dtype == np.int32, (t.shape, t.dtype)
        np.testing.assert_array_equal(t, np.load("tokens.npy"))
        r = np.asarray(dec.call(w, t[:2]))  # another batch size: the batch dim is symbolic
        np.testing.assert_allclose(r, np.load("recon.npy")[:2], rtol=1e-5)
        print("standalone ok", spec["version"])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "standalone ok" in proc.stdout


def test_export_mismatches_are_clear_errors(exported, tmp_path):
    bad = tmp_path / "bad_version"
    shutil.copytree(exported, bad)
    spec = json.loads((bad / "config.json").read_text())
    spec["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load(bad)
    bad = tmp_path / "bad_shape"
    shutil.copytree(exported, bad)
    with np.load(bad / "weights.npz") as z:
        w = {k: z[k] for k in z.files}
    key = next(k for k in w if k.endswith("stem/kernel"))
    w[key] = np.zeros((1, 1, 1, 1), np.float32)
    np.savez(bad / "weights.npz", **w)
    with pytest.raises(ValueError, match=r"stem/kernel: expected \(3, 3, 4, 16\)"):
        load(bad)
    bad = tmp_path / "bad_grid"
    shutil.copytree(exported, bad)
    spec = json.loads((bad / "config.json").read_text())
    spec["grid"] = [4, 4]
    (bad / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="contradict its tokenizer config"):
        load(bad)
    (bad / "decode.jaxexport").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['decode.jaxexport'\]"):
        load_export(bad)


def test_export_never_half_writes(exported, tmp_path, monkeypatch):
    tok = load(exported)
    before = sorted(p.name for p in exported.iterdir())
    with pytest.raises(FileExistsError, match="overwrite"):
        export(tok, exported)
    assert sorted(p.name for p in exported.iterdir()) == before

    def fail(spec):  # dies after the weights and functions are written, before config.json
        raise RuntimeError("disk full")

    import fourm.tokenizers.export as export_mod

    monkeypatch.setattr(export_mod, "_readme", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(tok, tmp_path / "out", platforms=("cpu",))
    assert list(tmp_path.iterdir()) == []  # no target, no temporary leftovers
    with pytest.raises(RuntimeError, match="disk full"):  # a failed overwrite keeps the old one
        export(tok, exported, platforms=("cpu",), overwrite=True)
    assert sorted(p.name for p in exported.iterdir()) == before
    assert load(exported).version == tok.version


def test_abstract_model_is_built_once_per_config():
    """Loading a tokenizer needs its structure several times; it is traced once per config."""
    from fourm.config import REPO_ROOT, load_config
    from fourm.tokenizers.image import abstract_vqvae

    a = load_config(f"{REPO_ROOT / 'tokenizers' / 'depth.py'}:64,tiny")
    b = load_config(f"{REPO_ROOT / 'tokenizers' / 'depth.py'}:64,tiny")
    c = load_config(f"{REPO_ROOT / 'tokenizers' / 'normals.py'}:64,tiny")
    assert abstract_vqvae(a)[1] is abstract_vqvae(b)[1]
    assert abstract_vqvae(c)[1] is not abstract_vqvae(a)[1]
    assert abstract_vqvae(c)[0].kind != abstract_vqvae(a)[0].kind
