"""Orbax checkpoints of a training run: train state, grain iterator state and the resolved config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config, meta}`. `state` is the train-state
pytree (params, optimizer state, step), saved asynchronously: `save` returns once arrays are on
host, the writes finish on a background thread. (On CPU "on host" means numpy views of the device
buffers; JAX does not donate a buffer that such a view references, so the next, donating, step
cannot overwrite what is being written.) `data` is grain's per-process iterator state
(`process_<i>-of-<n>.json`). `config` is the resolved config as JSON, for humans and for the
"checkpoint from another model" error. `meta` is small run facts as JSON, e.g. the fingerprint
of the compiled train step (see `trainer.program_fingerprint`).

Restore walks the steps newest first: a checkpoint that cannot be read (interrupted save,
truncated or corrupt file) is reported and the previous one is tried. A checkpoint whose arrays
have other shapes than the model being trained is an error, not a fallback: it means the wrong
work directory or config, and silently training from scratch would hide that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the model/optimizer being trained."""


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
        return jax.tree_util.keystr(path, simple=True, separator="/")
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
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
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
        """Start saving; returns once device arrays are on host (writes continue in background)."""
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Restored:
        where = f"{self.directory / str(step)}"
        try:
            item_meta = self.manager.item_metadata(step)
            state_meta = item_meta["state"] if item_meta is not None else None
        except Exception as e:  # noqa: BLE001 - unreadable metadata = corrupt checkpoint
            raise _Corrupt(f"cannot read its metadata ({type(e).__name__}: {str(e)[:300]})") from e
        if state_meta is None:
            raise _Corrupt("it has no readable 'state' item")
        check_compatible(state_meta, abstract_state, where)
        items = dict(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore())
        if (self.directory / str(step) / "meta").is_dir():
            items["meta"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            raise _Corrupt(f"{type(e).__name__}: {str(e)[:500]}") from e
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
        """Newest readable checkpoint restored onto `abstract_state`'s shardings, or None."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad = []
        for i, step in enumerate(steps):
            try:
                restored = self._restore_step(step, abstract_state, data_iter)
            except _Corrupt as e:
                older = steps[i + 1] if i + 1 < len(steps) else None
                log.error("checkpoint %s is corrupt or partial: %s; %s", self.directory / str(step),
                          e, f"falling back to step {older}" if older is not None
                          else "no older checkpoint, starting from scratch")
                bad.append(step)
                continue
            self._set_aside(bad)
            return restored
        self._set_aside(bad)
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
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
        _sync("fourm_set_aside_corrupt")
        self.manager.reload()


class _Corrupt(Exception):
    pass


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _saved_json(directory: str | Path, step: int, item: str) -> dict | None:
    p = Path(directory) / str(step) / item / "metadata"  # where orbax's JsonCheckpointHandler writes
    if p.exists():
        return json.loads(p.read_text())
    return None


def saved_meta(directory: str | Path, step: int) -> dict | None:
    return _saved_json(directory, step, "meta")


def tree_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays (used by resume tests and tools)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
