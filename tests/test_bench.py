"""fourm-bench: result records, table, JSON round trip and comparison; FLOP counting; CLI smoke.

No timings are asserted (the machine is shared): only that figures exist, are sane and add up.
Everything that imports the per-area benchmark modules runs in a subprocess: they define absl flags
at import, which would clash with other commands' flags in this pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fourm.bench import common
from fourm.bench.common import Result

REPO = Path(__file__).resolve().parents[1]


def _run(args, timeout=300, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def _results():
    return [Result("model.tiny.fwd", 0.24, 8533.3, "tokens/s", peak_rss=3 << 30, flops=6e10, reference_s=0.48),
            Result("scenes.64.one_core", 0.004, 250.0, "scenes/s", peak_rss=50 << 20, peak_rss_cumulative=True,
                   extra=dict(num=10))]


def test_table_has_every_column_and_the_reference_ratio():
    table = common.format_table(_results(), peak_flops=989e12)
    head = table.splitlines()[0]
    for col in ("name", "time", "CPU time", "throughput", "peak mem", "FLOPs", "FLOP/s", "MFU", "vs reference"):
        assert col in head
    row = next(line for line in table.splitlines() if line.startswith("model.tiny.fwd"))
    assert "2.00x recorded (ref 480.0 ms)" in row and "250 G/s" in row and "3.000 GiB" in row
    assert "0.03%" in row  # 250 GFLOP/s of 989 TFLOP/s
    assert "includes earlier ones" in table  # the cumulative-RSS footnote
    assert "another, slower VM" in table  # recorded seconds say where they come from
    assert "MFU" not in common.format_table(_results())


def test_json_round_trip_and_comparison(tmp_path):
    path = common.write_json(tmp_path / "sub" / "old.json", _results(), dict(commit="abc", time="t"))
    meta, back = common.read_json(path)
    assert meta["commit"] == "abc" and [r.name for r in back] == ["model.tiny.fwd", "scenes.64.one_core"]
    assert back[0].flops_per_s == pytest.approx(2.5e11) and back[1].extra == {"num": 10}
    assert not list(path.parent.glob(".*tmp*"))  # atomic write leaves nothing behind
    new = [Result("model.tiny.fwd", 0.12, peak_rss=6 << 30), Result("generate.tiny.chain", 1.0)]
    text = common.format_comparison(new, back, meta)
    row = next(line for line in text.splitlines() if line.startswith("model.tiny.fwd"))
    assert "2.00x" in row and row.rstrip().endswith("2.00x")  # speed-up and memory ratio
    assert "commit abc" in text and "only in the old file: scenes.64.one_core" in text


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema": "other", "results": []}))
    with pytest.raises(ValueError, match=r"x\.json.*schema 'other'"):
        common.read_json(bad)
    bad.write_text(json.dumps({"schema": common.SCHEMA, "results": [{"seconds": 1.0}]}))
    with pytest.raises(ValueError, match=r"results\[0\].*missing.*name"):
        common.read_json(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        common.read_json(tmp_path / "nope.json")


def test_timing_and_peak_memory():
    calls = []
    t = common.time_calls(lambda: calls.append(1), iters=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3 and t.min_s <= t.median_s
    if common.reset_peak_rss():  # Linux: the mark can be reset, so a new peak is this block's
        before = common.peak_rss_bytes()
        a = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
        assert common.peak_rss_bytes() - before > 48 << 20
        del a
    assert common.peak_rss_bytes() > 0


def test_model_flops_count_every_layer():
    """The unrolled twin counts each layer (XLA's analysis of a scan counts one): the FLOPs added by
    one encoder + one decoder layer match the matmul count, forward+backward is ~3x forward."""
    script = """
import json
from flax import nnx
from fourm.config import load_config
from fourm.bench import suite
from fourm.model import build_model
c = load_config("bench:quick")
out = {}
for depth in (1, 2):
    c.model.depth = depth
    cfg = suite.model_config(c, "tiny")
    spec = nnx.eval_shape(lambda: build_model(cfg)).spec
    out[depth] = suite.model_flops(cfg, suite.model_batch(c, spec))
out["shape"] = [c.model.batch, c.model.input_tokens, c.model.target_tokens]
print(json.dumps(out, default=float))
"""
    r = _run(["-c", script])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    b, n_in, n_t = out["shape"]
    d, h = 384, 1024  # tiny: dim 384, SwiGLU hidden int(2 * 4 * 384 / 3)
    enc = 2 * (4 * d * d + 3 * d * h) * b * n_in + 4 * b * n_in * n_in * d
    dec = (2 * (6 * d * d + 3 * d * h) * b * n_t + 4 * d * d * b * n_in  # + context K/V
           + 4 * b * n_t * n_t * d + 4 * b * n_t * n_in * d)
    per_layer = out["2"]["fwd"] - out["1"]["fwd"]
    assert per_layer == pytest.approx(enc + dec, rel=0.02)
    assert out["1"]["head_fwd"] > 0 and out["1"]["fwd"] > out["1"]["trunk_fwd"]
    assert 2.5 < out["2"]["fwd_bwd"] / out["2"]["fwd"] < 3.5


def test_cli_quick_selection_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _run(["-m", "fourm.cli.bench", "--quick", "--noisolate", "--only", "masking,scenes",
              "--config.scenes.num=10", "--json", str(out)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "name" in r.stdout and "vs reference" in r.stdout and "masking.sample" in r.stdout
    meta, results = common.read_json(out)
    assert meta["config"]["quick"] and meta["failed"] == {} and meta["backend"] == "cpu"
    names = {x.name for x in results}
    assert {"masking.sample", "scenes.64.one_core", "scenes.64.workers1"} <= names
    for x in results:
        assert x.seconds > 0 and x.throughput > 0 and x.peak_rss > 0
    # Comparing a run with itself: every ratio is 1.
    text = common.format_comparison(results, results)
    assert text.count("1.00x") >= 2 * len(results)


def test_cli_rejects_unknown_group_and_helps():
    r = _run(["-m", "fourm.cli.bench", "--only", "model,nosuch"])
    assert r.returncode != 0 and "nosuch" in r.stderr and "known" in r.stderr
    r = _run(["-m", "fourm.cli.bench", "--help"])
    assert r.returncode == 0 and "--compare" in r.stdout and "--peak_tflops" in r.stdout


def test_device_gpu_variant_and_the_accelerator_groups_on_cpu(tmp_path):
    """`--device gpu` picks configs/bench.py:gpu (bf16, 4M-B/L train steps, MFU); the same groups
    (model, train step, MaskGIT + caption, tokenizer encode) run end to end with --device cpu at
    tiny shapes and land in the JSON with their FLOPs, compile times and step programs."""
    from fourm.config import load_config

    g = load_config("bench:gpu")
    assert g.device == "gpu" and list(g.train.sizes) == ["base", "large"]
    assert list(g.generate.batches) == [1, 8] and g.model.batch == 128
    out = tmp_path / "acc.json"
    r = _run(["-m", "fourm.cli.bench", "--quick", "--device", "cpu", "--noisolate", "--iters", "1",
              "--only", "train,generate,tokenizer", "--config.model.depth=1",
              "--config.generate.caption_tokens=2", "--config.generate.steps=2",
              "--config.tokenizer.captions=20", "--json", str(out)], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta, results = common.read_json(out)
    assert meta["failed"] == {} and meta["dtype"] == "float32"
    by = {x.name: x for x in results}
    step = by["train.tiny.step"]
    assert step.flops > 0 and step.extra["attention"] == "xla" and "cost analysis" in step.note
    mg = by["generate.tiny.maskgit"]
    assert mg.unit == "samples/s" and mg.extra["programs"] >= 1 and mg.extra["compile_s"] >= 0
    assert "generate.tiny.caption" in by
    assert any(n.startswith("tokenizer.") for n in by)
