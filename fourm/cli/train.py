"""`fourm-train`: pretrain the 4M encoder-decoder from pre-tokenized shards.

    fourm-train --config configs/pretrain.py:smoke --config.data.dir=DATA --workdir runs/smoke
    fourm-train --config configs/pretrain.py:tiny --config.data.dir=DATA --config.mesh.fsdp=2

Rerunning the same command resumes from the newest good checkpoint in the work directory. SIGTERM
saves at the next step boundary and exits 0. Multi-host: see launch/ (jax.distributed starts from
the launcher's environment). The config is checked (steps, batch, learning rate, data folder,
known keys) before any data is read. Exit status: 0 done or preempted, 2 bad input or config,
3 NaN/Inf stop.
"""

from __future__ import annotations

import sys

from absl import app, flags

from fourm.cli import entry
from fourm.config import define_config_flag


def define_flags(fv, argv):
    define_config_flag("pretrain", fv, argv)
    flags.DEFINE_string("workdir", None, "work directory (default: config.workdir)", flag_values=fv)
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "start jax.distributed (auto: when a launcher set the environment)", flag_values=fv)


def run(args, F) -> int:
    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments: {args[1:]}")
    from fourm.train.validate import check_config

    check_config(F.config)  # before devices start or anything is read
    from fourm.hostmem import keep_freed_memory
    from fourm.train import distributed

    keep_freed_memory()  # before JAX starts its thread pools: steps stop re-faulting freed memory
    distributed.initialize(F.distributed)  # before anything touches a jax backend
    from fourm.train import trainer

    try:
        result = trainer.train(F.config, F.workdir)
    except trainer.NonFiniteError as e:
        print(f"fourm-train: stopped: {e}", file=sys.stderr)
        return 3
    loss = result.last_metrics.get("loss")
    if result.preempted and result.step == 0:  # a SIGTERM before the first step saves nothing
        state = "preempted before the first step, nothing saved"
    else:
        state = ("preempted, checkpoint saved" if result.preempted else "done") + f" at step {result.step}"
    print(f"fourm-train: {state}; " + (f"loss {loss:.4f}; " if loss is not None else "")
          + f"workdir {result.workdir}")
    return 0


main = entry(__name__)

if __name__ == "__main__":
    main()
