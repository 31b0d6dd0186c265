"""Orbax checkpoints of a training run: train state, grain iterator state and the resolved config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config, meta}`. `state` is the train-state
pytree (params, optimizer state, step), saved asynchronously: `save` returns once arrays are on
host, the writes finish on a background thread. (On CPU "on host" means numpy views of the device
buffers; JAX does not donate a buffer that such a view references, so the next, donating, step
cannot overwrite what is being written.) `data` is grain's per-process iterator state
(`process_<i>-of-<n>.json`). `config` is the resolved config as JSON, for humans and for the
"checkpoint from another model" error. `meta` is small run facts as JSON, e.g. the fingerprint
of the compiled train step (see `trainer.program_fingerprint`).

`integrity` is a content checksum of every state array (see `array_checksums`), computed on
device when the save starts and compared with the restored arrays: orbax checks only the index of
its files, so a same-size corruption of array data would otherwise restore as wrong weights.

Restore walks the steps newest first: a checkpoint that cannot be read (interrupted save,
truncated or corrupt file), whose arrays do not match their checksums, holds a non-finite value,
or has a file that resolves outside the checkpoint folder is corrupt: it is reported, renamed to
`<step>.corrupt` (kept for inspection) and the previous one is tried. When checkpoints exist but
none is good, restoring is an error (CheckpointCorruptError), never a silent start from scratch.
A checkpoint whose arrays have other shapes than the model being trained is an error, not a
fallback: it means the wrong work directory or config, and silently training from scratch would
hide that.

Durability: `save` returns once the arrays are on host; the files are written and the step is
finalised (renamed into place) in the background. `step_boundary(step)` waits for that once the
loop is `durable_within_steps` steps past the save, so the window in which a kill loses the
newest checkpoint is bounded (measured by `fourm.bench.integrity`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from fourm.io import PathEscapeError, inside

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the model/optimizer being trained."""


class CheckpointCorruptError(CheckpointMismatchError):
    """Checkpoints exist but none is good (all were set aside as `<step>.corrupt`). A subclass of
    CheckpointMismatchError: callers that stop on an unusable checkpoint stop on both."""


CHECKSUM_ALGORITHM = "fourm.wsum32x2/1"


def _words(x) -> jax.Array:
    """An array's bytes as uint32 words (one per element for 1-, 2- and 4-byte dtypes)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum_and_nonfinite(x) -> tuple[jax.Array, jax.Array]:
    """(uint32[2] checksum, count of NaN/Inf). The checksum is (sum of words, sum of word x odd
    weight of its flat index), both mod 2^32: any one changed word changes both (an odd weight is
    invertible mod 2^32), it is exact integer arithmetic (any reduction order, any sharding gives
    the same bits), and the flat index comes from iotas, so a sharded array is never reshaped or
    gathered."""
    w = _words(x)
    idx = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2 ** 32)
        stride *= w.shape[d]
    weighted = w * (idx * jnp.uint32(2) + jnp.uint32(1))
    sums = jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])
    if jnp.issubdtype(x.dtype, jnp.inexact):
        bad = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
    else:
        bad = jnp.zeros((), jnp.int32)
    return sums, bad


def _named_leaves(tree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


@functools.lru_cache(maxsize=8)
def _checksum_program(out_sharding):
    # One jitted function per output sharding: jax then compiles once per state layout, not per save.
    return jax.jit(lambda xs: [_checksum_and_nonfinite(x) for x in xs], out_shardings=out_sharding)


def array_checksums(tree) -> tuple[dict[str, str], dict[str, int]]:
    """({array path: checksum hex}, {array path: NaN/Inf count, where > 0}) of a pytree of arrays,
    computed on the arrays' devices (one small jitted program; only 12 bytes per array move)."""
    named = [(k, v) for k, v in _named_leaves(tree) if hasattr(v, "dtype") and hasattr(v, "shape")]
    arrays = [v for _, v in named]
    shardings = [getattr(v, "sharding", None) for v in arrays]
    mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
    # Replicated outputs: every process can read them in a multi-process run.
    fn = _checksum_program(None if mesh is None else NamedSharding(mesh, P()))
    if mesh is not None:
        with jax.set_mesh(mesh):
            outs = jax.device_get(fn(arrays))
    else:
        outs = jax.device_get(fn(arrays))
    sums = {k: f"{int(s[0]):08x}{int(s[1]):08x}" for (k, _), (s, _) in zip(named, outs)}
    bad = {k: int(b) for (k, _), (_, b) in zip(named, outs) if int(b) > 0}
    return sums, bad


def verify_arrays(tree, saved: dict | None) -> list[str]:
    """Problems of a restored tree, in words (empty = good): non-finite values, and arrays whose
    checksum differs from the one saved with them (`saved` None: written before checksums)."""
    sums, bad = array_checksums(tree)
    problems = [f"{k} holds {n} NaN/Inf values" for k, n in sorted(bad.items())]
    if saved is not None:
        if saved.get("algorithm") != CHECKSUM_ALGORITHM:
            problems.append(f"checksum algorithm {saved.get('algorithm')!r} is not {CHECKSUM_ALGORITHM!r}")
        else:
            want = saved.get("arrays", {})
            problems += [f"{k} does not match its checksum (saved {want.get(k)}, read {v})"
                         for k, v in sums.items() if want.get(k) != v]
            problems += [f"{k} is in the checksums but not in the restored state"
                         for k in sorted(set(want) - set(sums))]
    return problems


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_restored: bool  # False: grain state absent for this process layout; seek by step instead
    config: dict | None
    meta: dict | None = None  # None for checkpoints written before `meta` existed


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    # Orbax metadata turns namedtuple fields (optax states) into dict keys: compare by names only.
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return {name(p): (tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", ""))) for p, v in flat}


def check_compatible(saved_meta, abstract_state, where: str) -> None:
    """Raise CheckpointMismatchError naming the first differences in paths/shapes."""
    saved, want = _flat_shapes(saved_meta), _flat_shapes(abstract_state)
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    shape_diff = [(k, saved[k][0], want[k][0]) for k in sorted(set(saved) & set(want))
                  if saved[k][0] != want[k][0]]
    if not (missing or extra or shape_diff):
        return
    lines = [f"checkpoint {where} was written by a different model/optimizer shape:"]
    for k, got, exp in shape_diff[:8]:
        lines.append(f"  {k}: checkpoint has shape {got}, this model expects {exp}")
    if missing:
        lines.append(f"  {len(missing)} arrays missing from the checkpoint, e.g. {missing[:4]}")
    if extra:
        lines.append(f"  {len(extra)} arrays in the checkpoint unknown to this model, e.g. {extra[:4]}")
    lines.append("use a fresh workdir, or the config the checkpoint was written with "
                 "(its resolved config is saved next to it, in <step>/config)")
    raise CheckpointMismatchError("\n".join(lines))


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 durable_within_steps: int = -1):
        self.directory = Path(directory).absolute()
        self.durable_within_steps = int(durable_within_steps)
        self._in_flight: tuple[int, float] | None = None  # (step, time.perf_counter() at save)
        self.durable_s: dict[int, float] = {}  # step -> seconds from save() to finalised
        self._report_partial()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        # Handlers named up front so metadata of existing checkpoints can be read before any save.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "integrity": ocp.JsonCheckpointHandler(),
        })

    def _report_partial(self) -> None:
        if not self.directory.exists():
            return
        for p in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
            log.warning("ignoring partial checkpoint %s (a save was interrupted before it "
                        "committed); it will be removed", p)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, config: dict, *, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start saving; returns once device arrays are on host (writes continue in background).
        The arrays' checksums are computed first, from the very arrays being saved."""
        t0 = time.perf_counter()
        sums, _ = array_checksums(state)
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                     integrity=ocp.args.JsonSave(dict(algorithm=CHECKSUM_ALGORITHM, arrays=sums)))
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._note_durable()  # orbax waits for the previous save before starting this one
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._in_flight = (step, t0)
        return saved

    def _note_durable(self) -> None:
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            step, t0 = self._in_flight
            self.durable_s[step] = time.perf_counter() - t0
            self._in_flight = None
            log.debug("checkpoint %d durable %.2f s after its save started", step, self.durable_s[step])

    def step_boundary(self, step: int) -> None:
        """Called by the loop after each step: once `durable_within_steps` steps have passed since
        a save that is still being written, wait for it (then a kill can no longer lose it)."""
        self._note_durable()
        if (self._in_flight is not None and self.durable_within_steps >= 0
                and step - self._in_flight[0] >= self.durable_within_steps):
            self.wait()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self._in_flight is not None:
            self._note_durable()

    def close(self) -> None:
        self.manager.close()

    def _restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Restored:
        where = f"{self.directory / str(step)}"
        try:
            _check_inside(self.directory, str(step))
        except PathEscapeError as e:
            raise _Corrupt(str(e)) from None
        try:
            item_meta = self.manager.item_metadata(step)
            state_meta = item_meta["state"] if item_meta is not None else None
        except Exception as e:  # noqa: BLE001 - unreadable metadata = corrupt checkpoint
            raise _Corrupt(f"cannot read its metadata ({type(e).__name__}: {str(e)[:300]})") from e
        if state_meta is None:
            raise _Corrupt("it has no readable 'state' item")
        check_compatible(state_meta, abstract_state, where)
        items = dict(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore())
        for optional in ("meta", "integrity"):
            if (self.directory / str(step) / optional).is_dir():
                items[optional] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            raise _Corrupt(f"{type(e).__name__}: {str(e)[:500]}") from e
        if out.get("integrity") is None:
            log.warning("checkpoint %s has no array checksums (written by an older fourm): only "
                        "checked for NaN/Inf", where)
        problems = verify_arrays(out["state"], out.get("integrity"))
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise _Corrupt("; ".join(problems[:3]) + more)
        # grain writes one file per process; a run resumed with another process count has none
        # for its layout, and then the caller positions the pipeline from the step instead.
        pi, pc = jax.process_index(), jax.process_count()
        data_file = self.directory / str(step) / "data" / f"process_{pi}-of-{pc}.json"
        data_restored = False
        if data_iter is not None and data_file.exists():
            try:
                self.manager.restore(step, args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(data_iter)))
                data_restored = True
            except Exception as e:  # noqa: BLE001
                raise _Corrupt(f"data iterator state: {type(e).__name__}: {e}") from e
        elif data_iter is not None:
            log.warning("checkpoint %s has no data-iterator state for process %d of %d (written "
                        "with another process count); the input pipeline is positioned from the "
                        "step instead", where, pi, pc)
        return Restored(step, out["state"], data_restored, out.get("config"), out.get("meta"))

    def restore_latest(self, abstract_state: Any, data_iter: Any = None) -> Restored | None:
        """Newest good checkpoint restored onto `abstract_state`'s shardings; None when there are
        no checkpoints; CheckpointCorruptError when there are some but none is good."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad = []
        for i, step in enumerate(steps):
            try:
                restored = self._restore_step(step, abstract_state, data_iter)
            except _Corrupt as e:
                older = steps[i + 1] if i + 1 < len(steps) else None
                log.error("checkpoint %s is corrupt or partial: %s; %s", self.directory / str(step),
                          e, f"falling back to step {older}" if older is not None
                          else "no older checkpoint")
                bad.append(step)
                continue
            self._set_aside(bad)
            return restored
        self._set_aside(bad)
        aside = sorted(p.name for p in self.directory.glob("*.corrupt*")) if self.directory.exists() else []
        if aside:
            raise CheckpointCorruptError(
                f"no good checkpoint in {self.directory}: {len(aside)} corrupt ones set aside "
                f"({', '.join(aside[:5])}); refusing to start from scratch over them. Restore a good "
                f"copy, or remove the *.corrupt folders (or use a fresh workdir) to start anew")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable steps to `<step>.corrupt`: kept for inspection, and out of the way of
        the re-run, which will save those step numbers again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}.corrupt"
                if dst.exists():
                    dst = self.directory / f"{s}.corrupt.{len(list(self.directory.glob(f'{s}.corrupt*')))}"
                src.rename(dst)
                log.warning("moved corrupt checkpoint %s aside to %s", src, dst)
        _sync("fourm_set_aside_corrupt")
        self.manager.reload()


class _Corrupt(Exception):
    pass


def _check_inside(directory: Path, step_dir: str) -> None:
    """Every file of a checkpoint step resolves inside the checkpoint folder (orbax would follow
    a symlink anywhere)."""
    top = inside(directory, step_dir, "checkpoint")
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            inside(directory, Path(root, name).relative_to(directory), "checkpoint file")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _saved_json(directory: str | Path, step: int, item: str) -> dict | None:
    p = Path(directory) / str(step) / item / "metadata"  # where orbax's JsonCheckpointHandler writes
    if p.exists():
        return json.loads(p.read_text())
    return None


def saved_config(directory: str | Path, step: int) -> dict | None:
    return _saved_json(directory, step, "config")


def saved_meta(directory: str | Path, step: int) -> dict | None:
    return _saved_json(directory, step, "meta")


def tree_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays (used by resume tests and tools)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
