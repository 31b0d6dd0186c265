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
    assert "roofline per chip (v5p" in text and report.bytes_accessed > 0
    assert os.environ.get("JAX_PLATFORMS") == "cpu"  # the default backend stayed CPU


def test_roofline_from_xla_cost_analysis():
    """XLA's FLOPs and bytes of a compiled program -> compute and memory time per chip."""
    import jax
    import jax.numpy as jnp

    from fourm.train import roofline

    n = 256
    x = jax.ShapeDtypeStruct((n, n), jnp.float32)
    compiled = jax.jit(jnp.dot).lower(x, x).compile()
    report = aot.analyse(compiled, topology="v5p-8", num_chips=4, mesh={"data": 4}, params=0,
                         compile_s=0.0, model_flops=4 * 2.0 * n ** 3)
    assert report.flops == pytest.approx(2.0 * n ** 3, rel=0.01)
    assert report.bytes_accessed >= 3 * n * n * 4  # two inputs read, one output written
    est = roofline.estimate(report.flops, report.bytes_accessed, "v5p")
    assert est.compute_s == pytest.approx(2.0 * n ** 3 / 459e12, rel=0.01)
    assert est.memory_s == pytest.approx(report.bytes_accessed / 2.765e12)
    assert est.bound == "memory" and est.step_s == est.memory_s  # 85 FLOP/byte < ridge 166
    text = aot.format_report(report, aot.parse_topology("v5p-8").hbm_bytes)
    assert "roofline per chip (v5p: 459 TFLOP/s bf16, 2.77 TB/s HBM)" in text
    assert "memory-bound" in text
    with pytest.raises(ValueError, match="no peak figures for chip 'v9'"):
        roofline.estimate(1.0, 1.0, "v9")
