"""`fourm-aot`: compile the real train step for a TPU pod slice on this machine (no TPU needed).

    fourm-aot --config configs/pretrain.py:base --topology v5p-128
    fourm-aot --config configs/pretrain.py:large --topology v5p:4x4x8 --config.mesh.fsdp=-1
    fourm-aot --config configs/pretrain.py:xlarge --topology v5p-256,v5p-512 --json figures.json

Topology syntax: Cloud TPU accelerator types (v5p-128, v4-64, v5e-16 / v5litepod-16, v6e-64; for
v4/v5p the number counts TensorCores, two per chip) or a chip grid (v5p:4x4x4). Prints memory per
chip (and whether it fits the chip's HBM), FLOPs per step and the collective ops. Needs libtpu
(the `tpu` extra). Exit status 1 if any topology does not fit.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags

from fourm.config import define_config_flag
from fourm.io import atomic_write_json

_CONFIG = define_config_flag("pretrain:base")
_TOPOLOGY = flags.DEFINE_list("topology", ["v5p-128"], "TPU slice(s), comma separated")
_JSON = flags.DEFINE_string("json", None, "also write the figures to this JSON file")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm.train import aot

    reports, fits_all = [], True
    for name in _TOPOLOGY.value:
        topo = aot.parse_topology(name)
        report = aot.compile_for_topology(_CONFIG.value, name)
        fits_all &= report.fits(topo.hbm_bytes)
        print(aot.format_report(report, topo.hbm_bytes), flush=True)
        reports.append(dict(dataclasses.asdict(report), peak_bytes=report.peak_bytes,
                            hbm_bytes=topo.hbm_bytes, fits=report.fits(topo.hbm_bytes)))
    if _JSON.value:
        atomic_write_json(_JSON.value, reports, sort_keys=False)
    if not fits_all:
        raise SystemExit(1)


def main():
    # The TPU compiler runs on this CPU machine: keep JAX's default backend on CPU, and let libtpu
    # load even if another process holds its lock (we compile only, never touch a chip).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    app.run(_main)


if __name__ == "__main__":
    main()
