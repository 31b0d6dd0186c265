"""fourm-bench's same-run reference (fourm.bench.reference) against a fake worker.

tests/fake_reference_worker.py speaks the real worker's JSON-lines protocol without torch, run by
sys.executable: alternation and the order flip (read from both sides' timestamps), the median of
per-round ratios, errors, the table and the JSON through the CLI. Nothing here needs torch or
ml-4m; no timing is asserted except the scripted ones.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from fourm.bench import common, reference
from fourm.bench.common import Result, Timing

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_reference_worker.py"


def _worker(**kw):
    return reference.ReferenceWorker(sys.executable, "/nowhere", script=FAKE, timeout_s=60, **kw)


def test_alternates_flips_the_order_and_takes_the_median_of_per_round_ratios(tmp_path, monkeypatch):
    log = tmp_path / "ref.log"
    monkeypatch.setenv("FAKE_REF_LOG", str(log))
    monkeypatch.setenv("FAKE_REF_TIMES", json.dumps([3.0, 1.0, [8.0, 8.0, 100.0]]))
    fourm_medians = iter([1.0, 1.0, 4.0])
    stamps = []

    def fake_time_calls(fn, iters, warmup=1):  # fourm's side: real calls, scripted medians
        for _ in range(warmup + iters):
            fn()
        m = next(fourm_medians)
        return Timing(first_s=9.0, median_s=m, min_s=m, cpu_s=2 * m, times=[m] * iters)

    monkeypatch.setattr(reference, "time_calls", fake_time_calls)
    w = _worker()
    try:
        live = reference.side_by_side(lambda: stamps.append(time.monotonic_ns()), w, "tiny", "fwd",
                                      rounds=3, iters=3, log=lambda *a, **k: None)
    finally:
        w.close()
    # ratios ref / fourm per round: 3/1, 1/1, 8/4 -> median 2 (the ratio of medians would be 3)
    assert [r["ratio"] for r in live["rounds"]] == [3.0, 1.0, 2.0]
    assert live["ratio"] == 2.0 and live["ref_s"] == 3.0 and live["fourm_s"] == 1.0
    assert [r["order"] for r in live["rounds"]] == [["fourm", "ref"], ["ref", "fourm"], ["fourm", "ref"]]
    assert live["rounds"][2]["ref_times"] == [8.0, 8.0, 100.0]  # both sides' calls are kept
    assert live["ref_cpu_s"] == 6.0 and live["ref_faults_per_call"] == 10.0
    assert len(live["load_start"]) == 3 and len(live["load_end"]) == 3 and live["worker"]["torch"] == "fake"
    # The two processes' timelines: f f f f | R | R | f f f f | f f f f | R (each side's warm-up + 3
    # calls as one block), i.e. fourm first in rounds 0 and 2, the reference first in round 1.
    events = sorted([(t, "f") for t in stamps] + [(int(line.split()[0]), "R") for line in
                                                  log.read_text().splitlines() if " time " in line])
    blocks = []
    for _, side in events:
        if not blocks or blocks[-1][0] != side:
            blocks.append([side, 0])
        blocks[-1][1] += 1
    assert blocks == [["f", 4], ["R", 2], ["f", 8], ["R", 1]]


def test_attach_puts_both_sides_on_the_result_and_the_table_says_same_run():
    live = dict(source="same run", ratio=1.25, ref_s=2.5, fourm_s=2.0, rounds=[dict(ratio=x) for x in (1.2, 1.25, 1.3)],
                ref_cpu_s=5.0, fourm_cpu_s=3.9, ref_faults_per_call=100.0, fourm_faults_per_call=7.0,
                load_start=[0.5, 0, 0], load_end=[1.5, 0, 0], worker=dict(torch="2.14.1", threads=2))
    r = reference.attach(Result("model.tiny.fwd_bwd", 2.1, 100.0, "tokens/s"), live)
    back = Result.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.reference_ratio == 1.25 and back.reference_s == 2.5 and back.reference_source == "same run"
    assert back.extra["reference"]["fourm_s"] == 2.0
    table = common.format_table([back])
    row = next(line for line in table.splitlines() if line.startswith("model.tiny.fwd_bwd"))
    # The ratio is the median of per-round ratios, not ref_s / seconds (2.5 / 2.1 = 1.19).
    assert "1.25x same run (ml-4m 2.50 s / fourm 2.00 s, 3 rounds)" in row
    assert "order flipped every round" in table and "recorded" not in table
    details = reference.format_details([back])
    assert "torch 2.14.1" in details and "load 0.5 -> 1.5" in details and "page faults/call ml-4m 100" in details
    assert "rounds: 1.20, 1.25, 1.30" in details and "WARNING" not in details
    back.extra["reference"]["load_end"] = [3 * (os.cpu_count() or 1), 0, 0]
    assert "WARNING: load average up to" in reference.format_details([back])


def test_recorded_seconds_are_never_shown_as_a_same_run_ratio():
    table = common.format_table([Result("model.tiny.fwd", 0.24, reference_s=0.48)])
    row = next(line for line in table.splitlines() if line.startswith("model.tiny.fwd"))
    assert "2.00x recorded (ref 480.0 ms)" in row and "same run" not in row
    assert "another, slower VM" in table and "REFERENCE_S" in table


def test_batch_counts_are_per_sample_and_modality():
    """What the worker is told to build: fourm's token counts per sample, input and target side."""
    from fourm.model import model_config
    from fourm.model.spec import ModelSpec
    from fourm.model.synthetic import synthetic_batch

    cfg = model_config("tiny")
    cfg.family, cfg.modalities = "ml4m", list(reference.MODALITIES)
    spec = ModelSpec.from_config(cfg)
    b = synthetic_batch(spec, 3, 128, 128, seed=4)
    got = reference.batch_counts(spec, b)
    assert (got["size"], got["input_tokens"], got["target_tokens"]) == (3, 128, 128)
    assert sorted(got["enc_counts"]) == sorted(reference.MODALITIES)
    assert sorted(got["dec_counts"]) == ["caption", "tok_depth@224", "tok_rgb@224"]  # pixels are input only
    for side, key in (("enc_counts", "enc"), ("dec_counts", "dec")):
        totals = np.sum([got[side][m] for m in got[side]], axis=0)
        assert totals.tolist() == b[f"{key}_valid"].sum(1).tolist()  # every valid slot counted once
    names = [m.name for m in spec.modalities]
    depth = names.index("tok_depth@224")
    assert got["dec_counts"]["tok_depth@224"] == ((b["dec_mod"] == depth) & b["dec_valid"]).sum(1).tolist()
    assert reference.model_spec(cfg) == dict(dim=384, encoder_depth=6, decoder_depth=6, num_heads=6, mlp_ratio=4.0)
    reference.check_built(dict(dim=384, encoder_depth=6, decoder_depth=6, mlp_hidden=1024), cfg)
    with pytest.raises(reference.ReferenceWorkerError, match="MLP width"):
        reference.check_built(dict(dim=384, encoder_depth=6, decoder_depth=6, mlp_hidden=1536), cfg)


def test_worker_errors_are_one_line_and_name_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_REF_FAIL", "maskgit")
    w = _worker()
    try:
        with pytest.raises(reference.ReferenceWorkerError, match="maskgit.*scripted failure"):
            w.time("tiny", "maskgit", 1)
        assert w.time("tiny", "fwd", 1)["calls"] == 2  # the worker stays up after an error
    finally:
        w.close()
    assert w.proc.returncode == 0
    with pytest.raises(reference.ReferenceWorkerError, match="cannot start"):
        reference.ReferenceWorker(str(tmp_path / "no-python"), "/nowhere")
    bad = tmp_path / "crash.py"
    bad.write_text("import sys; sys.exit(3)\n")
    with pytest.raises(reference.ReferenceWorkerError, match="exited .status 3"):
        reference.ReferenceWorker(sys.executable, "/nowhere", script=bad)


def test_check_config_names_the_field(tmp_path):
    from fourm.config import load_config

    c = load_config("bench")
    reference.check_config(c)  # no reference: nothing to check
    c.reference.python = sys.executable
    with pytest.raises(ValueError, match="--reference_src"):
        reference.check_config(c)
    c.reference.src = str(tmp_path)
    with pytest.raises(ValueError, match="no fourm/models/fm.py"):
        reference.check_config(c)
    (tmp_path / "fourm" / "models").mkdir(parents=True)
    (tmp_path / "fourm" / "models" / "fm.py").write_text("")
    reference.check_config(c)
    q = load_config("bench:quick")
    q.reference.update(python=sys.executable, src=str(tmp_path))
    with pytest.raises(ValueError, match="modalities"):
        reference.check_config(q)  # the real worker builds 4M's 224-px modalities only
    c.reference.python = str(tmp_path / "nosuch")
    with pytest.raises(ValueError, match="--reference_python.*does not exist"):
        reference.check_config(c)


def test_worker_script_imports_neither_the_project_nor_jax():
    """It runs in another interpreter; at module level it needs only the standard library."""
    tree = ast.parse((REPO / "fourm/bench/ml4m_reference_worker.py").read_text())
    everywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    everywhere |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not everywhere & {"jax", "jaxlib", "flax", "optax", "numpy"}
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top


def test_cli_same_run_reference_json_has_both_sides(tmp_path):
    """fourm-bench --only model with the fake worker: fourm's real model, the fake reference."""
    out, log = tmp_path / "bench.json", tmp_path / "ref.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", FAKE_REF_TIMES="[0.5]", FAKE_REF_LOG=str(log))
    r = subprocess.run(
        [sys.executable, "-m", "fourm.cli.bench", "--quick", "--noisolate", "--only", "model", "--iters", "1",
         "--config.model.depth=1", f"--reference_python={sys.executable}", "--reference_src=/nowhere",
         f"--config.reference.worker={FAKE}", "--config.reference.rounds=2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "same run (ml-4m 500.0 ms / fourm" in r.stdout and "same-run reference (ml-4m, torch fake" in r.stdout
    meta, results = common.read_json(out)
    assert meta["config"]["reference"]["python"] == sys.executable
    by = {x.name: x for x in results}
    for kind in ("fwd", "fwd_bwd"):
        live = by[f"model.tiny.{kind}"].extra["reference"]
        assert live["figure"] == kind and len(live["rounds"]) == 2 and live["ref_s"] == 0.5
        assert live["fourm_s"] > 0 and live["ratio"] == pytest.approx(
            float(np.median([x["ref_s"] / x["fourm_s"] for x in live["rounds"]])))
        assert by[f"model.tiny.{kind}"].reference_ratio == live["ratio"]
    # The build carried fourm's batch: per-sample counts summing to the budgets (quick: 32 + 32).
    requests = [line.split()[1:] for line in log.read_text().splitlines()]
    assert requests[0] == ["build", "tiny", "-"] and requests[-1][0] == "quit"
    assert [q[2] for q in requests if q[0] == "time"] == ["fwd", "fwd", "fwd_bwd", "fwd_bwd"]
