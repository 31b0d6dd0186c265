"""Multi-host: 2 processes x 4 CPU devices over jax.distributed (launch/local_multiprocess.sh)
train on the same global batches as 1 process x 8 devices and give the same losses."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fourm.bench.shards import make_scene_shards
from fourm.train import metrics

REPO = Path(__file__).resolve().parents[1]
# A smaller model than smoke: this test is about the multi-host plumbing, and compiles twice.
FLAGS = ["--config", "configs/pretrain.py:smoke", "--config.num_train_steps=4",
         "--config.ckpt_every=4", "--config.log_every=1", "--config.eval_every=0",
         "--config.model.dim=32", "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
         "--config.model.modalities=('tok_rgb@64','tok_depth@64','caption')"]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(Path(workdir) / "metrics.jsonl")}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    shards = tmp_path / "shards"
    make_scene_shards(shards, num_scenes=64, shard_size=32)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    one = subprocess.run(
        [sys.executable, "-m", "fourm.cli.train", *FLAGS, f"--config.data.dir={shards}",
         "--workdir", str(tmp_path / "one")], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr[-3000:]

    two = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "4", *FLAGS, f"--config.data.dir={shards}",
         "--workdir", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**env, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")})
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert two.returncode == 0, two.stderr[-2000:] + logs
    assert "process 1 of 2" in (tmp_path / "logs" / "process_1.log").read_text()

    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # Same data and program; only the cross-process reduction order may differ.
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
    # Each process wrote its own grain iterator state.
    data = tmp_path / "two" / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json",
                                                                   "process_1-of-2.json"]
