"""Ahead-of-time compilation of the real train step for a TPU slice, through libtpu, on CPU."""

import os

import pytest

from fourm.config import load_config
from fourm.train import aot


def _libtpu_importable() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _libtpu_importable(),
                    reason="libtpu is not installed (pip install 'libtpu==0.0.42.*', the version jax "
                           "0.10.2 pins): the TPU compiler is needed to compile for a TPU topology")
def test_compile_smoke_train_step_for_v5p_8(monkeypatch):
    # Compile only: let libtpu load even if another process on this machine holds its lock.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = load_config("pretrain:smoke", ["mesh.data=2", "mesh.fsdp=2"])
    report = aot.compile_for_topology(cfg, "v5p-8")
    assert report.num_chips == 4 and report.mesh == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report.params > 100_000
    assert 0 < report.peak_bytes < aot.parse_topology("v5p-8").hbm_bytes
    assert report.alias_bytes > 0  # the donated state is reused in place
    assert report.flops > 1e8
    # FSDP gathers parameters and reduce-scatters (or all-reduces) gradients.
    assert "all-gather" in report.collectives
    assert {"reduce-scatter", "all-reduce"} & set(report.collectives)
    text = aot.format_report(report, aot.parse_topology("v5p-8").hbm_bytes)
    assert "memory per chip" in text and "fits" in text and "collectives:" in text
    assert os.environ.get("JAX_PLATFORMS") == "cpu"  # the default backend stayed CPU
