"""Multi-host start-up: `jax.distributed.initialize` from the environment the launcher set.

Three launchers (see launch/):
* TPU pod slice: every worker runs the same command; JAX finds the coordinator from the TPU
  metadata (no variables needed).
* SLURM: one task per GPU; JAX reads SLURM_* (coordinator = first node of the step).
* Local: N processes on 127.0.0.1 with `JAX_COORDINATOR_ADDRESS`, `FOURM_NUM_PROCESSES`,
  `FOURM_PROCESS_ID` (launch/local_multiprocess.sh), CPU devices, gloo collectives.

`initialize()` must run before anything touches a jax backend.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def wants_distributed() -> bool:
    if _env_int("FOURM_NUM_PROCESSES") is not None:
        return _env_int("FOURM_NUM_PROCESSES") > 1
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return True
    # Multi-host TPU VM: the worker list names more than one host.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(mode: str = "auto") -> bool:
    """Start jax.distributed if `mode` is 'on', or 'auto' and a launcher asked for it."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and not wants_distributed()):
        return False
    import jax

    kwargs = {}
    n = _env_int("FOURM_NUM_PROCESSES")
    if n is not None:
        coord = os.environ.get("JAX_COORDINATOR_ADDRESS")
        pid = _env_int("FOURM_PROCESS_ID")
        if not coord or pid is None:
            raise ValueError("FOURM_NUM_PROCESSES is set, so JAX_COORDINATOR_ADDRESS (host:port) and "
                             "FOURM_PROCESS_ID must be set too")
        kwargs = dict(coordinator_address=coord, num_processes=n, process_id=pid)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms == "cpu" or (n is not None and "cuda" not in platforms and "tpu" not in platforms):
        # Cross-process collectives between CPU devices go over gloo (TCP).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
