"""`fourm-aot`: compile the real train step for a TPU pod slice on this machine (no TPU needed).

    fourm-aot --config configs/pretrain.py:base --topology v5p-128
    fourm-aot --config configs/pretrain.py:large --topology v5p:4x4x8 --config.mesh.fsdp=-1
    fourm-aot --config configs/pretrain.py:xlarge --topology v5p-256,v5p-512 --json figures.json

Topology syntax: Cloud TPU accelerator types (v5p-128, v4-64, v5e-16 / v5litepod-16, v6e-64; for
v4/v5p the number counts TensorCores, two per chip) or a chip grid (v5p:4x4x4). Prints memory per
chip (and whether it fits the chip's HBM), FLOPs and bytes per step (XLA cost analysis), a roofline
estimate of the step time per chip (fourm.train.roofline) and the collective ops. Needs libtpu
(the `tpu` extra). Exit status 1 if any topology does not fit.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

from fourm.cli import run_command
from fourm.config import define_config_flag
from fourm.io import atomic_write_json


def define_flags(fv, argv):
    define_config_flag("pretrain:base", fv, argv)
    flags.DEFINE_list("topology", ["v5p-128"], "TPU slice(s), comma separated", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the figures to this JSON file", flag_values=fv)


def run(argv, F) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm.train import aot

    reports, fits_all = [], True
    for name in F.topology:
        topo = aot.parse_topology(name)
        report = aot.compile_for_topology(F.config, name)
        fits_all &= report.fits(topo.hbm_bytes)
        print(aot.format_report(report, topo.hbm_bytes), flush=True)
        reports.append(dict(dataclasses.asdict(report), peak_bytes=report.peak_bytes,
                            hbm_bytes=topo.hbm_bytes, fits=report.fits(topo.hbm_bytes)))
    if F.json:
        atomic_write_json(F.json, reports, sort_keys=False)
    return 0 if fits_all else 1


def main(argv=None):
    # The TPU compiler runs on this CPU machine: keep JAX's default backend on CPU, and let libtpu
    # load even if another process holds its lock (we compile only, never touch a chip).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    rc = run_command(sys.modules[__name__], argv)
    if argv is None:
        sys.exit(rc)
    return rc


if __name__ == "__main__":
    main()
