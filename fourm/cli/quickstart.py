"""`fourm-quickstart`: the whole system on its embedded default, with a report at the end.

    fourm-quickstart                              # default profile (about 30 CPU-minutes)
    fourm-quickstart --config quickstart:smoke    # a few minutes
    fourm-quickstart --config.workdir=runs/qs2    # elsewhere

Runs scenes -> tokenizers -> pre-tokenize -> pretrain (8 simulated devices) -> generate -> report,
caching every stage in the workdir (a second run skips finished stages; a killed run resumes).
"""

from __future__ import annotations

import os
import sys


def _simulate_devices(n: int) -> None:
    # Must happen before jax is imported: XLA reads the flag once, at backend start.
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    from fourm.hostmem import keep_freed_memory

    keep_freed_memory()  # before JAX starts its thread pools: steps stop re-faulting freed memory
    _simulate_devices(8)
    from absl import app

    from fourm.config import define_config_flag

    config = define_config_flag("quickstart")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from absl import flags, logging

        if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
            logging.set_verbosity(logging.WARNING)
        from fourm import quickstart

        try:
            quickstart.run(config.value)
        except quickstart.WorkdirMismatchError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(_main)


if __name__ == "__main__":
    main()
