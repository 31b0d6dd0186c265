"""`fourm-train`: pretrain the 4M encoder-decoder from pre-tokenized shards.

    fourm-train --config configs/pretrain.py:smoke --config.data.dir=DATA --workdir runs/smoke
    fourm-train --config configs/pretrain.py:tiny --config.data.dir=DATA --config.mesh.fsdp=2

Rerunning the same command resumes from the newest good checkpoint in the work directory. SIGTERM
saves at the next step boundary and exits 0. Multi-host: see launch/ (jax.distributed starts from
the launcher's environment). Exit status: 0 done or preempted, 2 bad config, 3 NaN/Inf stop.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from fourm.config import define_config_flag

_CONFIG = define_config_flag("pretrain")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (default: config.workdir)")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "start jax.distributed (auto: when a launcher set the environment)")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm.hostmem import keep_freed_memory
    from fourm.train import distributed

    keep_freed_memory()  # before JAX starts its thread pools: steps stop re-faulting freed memory
    distributed.initialize(_DISTRIBUTED.value)  # before anything touches a jax backend
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax", "tensorboardX"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from fourm.train import trainer

    try:
        result = trainer.train(_CONFIG.value, _WORKDIR.value)
    except trainer.ConfigError as e:
        print(f"fourm-train: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except trainer.CheckpointMismatchError as e:
        print(f"fourm-train: checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)
    except trainer.NonFiniteError as e:
        print(f"fourm-train: stopped: {e}", file=sys.stderr)
        sys.exit(3)
    state = "preempted, checkpoint saved" if result.preempted else "done"
    print(f"fourm-train: {state} at step {result.step}; loss {result.last_metrics.get('loss')}; "
          f"workdir {result.workdir}")


def main():
    app.run(_main)


if __name__ == "__main__":
    main()
