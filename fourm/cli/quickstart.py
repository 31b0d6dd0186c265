"""`fourm-quickstart`: the whole system on its embedded default, with a report at the end.

    fourm-quickstart                              # default profile (about 30 CPU-minutes)
    fourm-quickstart --config quickstart:smoke    # a few minutes
    fourm-quickstart --config.workdir=runs/qs2    # elsewhere

Runs scenes -> tokenizers -> pre-tokenize -> pretrain -> generate -> report (on
`--config.num_devices` CPU devices: 1 by default, the fastest on a CPU; more are simulated),
caching every stage in the workdir (a second run skips finished stages; a killed run resumes).
Generation decodes with fourm's default sampling (greedy, as fourm-generate; see
fourm.generate.defaults) and reports its compile time apart from its run time.
"""

from __future__ import annotations

import os
import sys

from absl import app

from fourm.cli import run_command
from fourm.config import define_config_flag


def _simulate_devices(n: int) -> None:
    # Must happen before jax is imported: XLA reads the flag once, at backend start.
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _devices_from_argv(argv: list[str]) -> int:
    """`config.num_devices` as the command line will set it, read before JAX starts (the flags
    are parsed later); a config that does not load is reported by the real parse, so 1 here."""
    from fourm.config import load_config

    spec, override = "quickstart", None
    for i, a in enumerate(argv):
        for key in ("--config", "--config.num_devices"):
            if a == key and i + 1 < len(argv):
                val = argv[i + 1]
            elif a.startswith(key + "="):
                val = a[len(key) + 1:]
            else:
                continue
            if key == "--config":
                spec = val
            else:
                override = val
    try:
        return max(1, int(override if override is not None else load_config(spec).num_devices))
    except Exception:  # noqa: BLE001  (the absl parse names the problem)
        return 1


def define_flags(fv, argv):
    define_config_flag("quickstart", fv, argv)


def run(args, F) -> int:
    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments: {args[1:]}")
    from fourm import quickstart
    from fourm.cli import positive
    from fourm.hostmem import keep_freed_memory

    positive("--config.num_devices", int(F.config.num_devices))  # before anything is written

    keep_freed_memory()  # before JAX's first computation: steps stop re-faulting freed memory
    quickstart.run(F.config)
    return 0


def main(argv=None):
    _simulate_devices(_devices_from_argv(list(sys.argv[1:] if argv is None else argv[1:])))
    rc = run_command(sys.modules[__name__], argv)
    if argv is None:
        sys.exit(rc)
    return rc


if __name__ == "__main__":
    main()
