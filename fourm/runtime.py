"""Process set-up every command shares: JAX platform choice, the persistent compilation cache, and
compile-time accounting.

Compilation is most of what a user waits for in a one-off run (`fourm-generate` on one image, a
training restart), so every command keeps JAX's own persistent compilation cache in a per-user
folder: `$FOURM_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/fourm/jax_cache`, else
`~/.cache/fourm/jax_cache`. The folder only holds compiled programs keyed by their inputs; it is
safe to delete at any time (the next run compiles again). `FOURM_COMPILATION_CACHE=off` (or the
commands' `--compilation_cache=off`) disables it.

Set these up before `jax` is imported: JAX reads its platform and cache settings once.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from pathlib import Path

CACHE_ENV = "FOURM_COMPILATION_CACHE"
_OFF = ("", "off", "none", "0", "false")
# jax.monitoring events whose durations are compilation (tracing, lowering, XLA compile).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fourm" / "jax_cache"


def cache_dir(setting: str | None = None) -> Path | None:
    """The compilation cache folder for a flag value / the environment; None when disabled."""
    value = os.environ.get(CACHE_ENV) if setting is None else setting
    if value is None:
        return default_cache_dir()
    return None if value.strip().lower() in _OFF else Path(value).expanduser()


def enable_compilation_cache(setting: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `cache_dir(setting)` (before or after jax is
    imported). Returns the folder, or None when disabled or not creatable (then runs compile as
    usual: a cache is an optimisation, never a reason to fail)."""
    path = cache_dir(setting)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    # JAX caches only programs that took >= 1 s to compile by default; a generation or a first
    # training step is dozens of smaller ones (bucketed MaskGIT steps, the text decoder's prefill
    # and step, tokenizer decoders), which a warm process then compiled again. Cache them all
    # (an explicit JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins: the benchmark's "before").
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(path))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    else:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(path))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return path


def has_accelerator() -> bool:
    """A TPU (/dev/accel*, /dev/vfio/<n>) or an NVIDIA GPU device node on this machine."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"))


def choose_platform() -> None:
    """On a machine without TPU or GPU, run JAX on CPU only: otherwise an installed libtpu probes
    for a TPU and prints initialisation errors (host bounds, TPU_WORKER_HOSTNAMES) on every run.
    An explicit JAX_PLATFORMS is left alone."""
    if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
        os.environ["JAX_PLATFORMS"] = "cpu"


class CompileTimer:
    """Seconds JAX spent tracing, lowering and compiling while active (from jax.monitoring), so a
    command can report compile time apart from run time:

        with CompileTimer() as ct:
            ...
        print(f"compile {ct.seconds:.1f} s")
    """

    def __init__(self):
        self.seconds = 0.0

    def _listener(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += float(duration)

    def __enter__(self) -> "CompileTimer":
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        with contextlib.suppress(AssertionError):  # already removed (clear_event_listeners)
            jax.monitoring.unregister_event_duration_listener(self._listener)
