"""The quickstart's smoke profile end to end: every stage runs, the report is written, and a
second run skips every stage (the cache)."""

import json
import os
import subprocess
import sys

import pytest

from fourm.quickstart import STAGES


@pytest.mark.slow
def test_quickstart_smoke_runs_and_caches(tmp_path):
    work = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "fourm.cli.quickstart", "--config", "quickstart:smoke",
           f"--config.workdir={work}"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name, _ in STAGES:
        done = json.loads((work / name / "DONE.json").read_text())
        assert done["wall_s"] >= 0
    report = (work / "report.html").read_text()
    for picture in ("scenes/grid.png", "generate/rgb_to_all.png", "generate/caption_to_rgb.png",
                    "report/loss.png"):
        assert picture in report
        assert (work / picture).stat().st_size > 1000
    # The model learned something in its few steps: the loss fell.
    metrics = [json.loads(l) for l in (work / "pretrain" / "metrics.jsonl").read_text().splitlines() if l]
    losses = [m["loss"] for m in metrics if m.get("split") == "train" and "loss" in m]
    assert losses and losses[-1] < losses[0]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("cached") == len(STAGES), second.stdout
