"""Checks of a pretraining config that need neither data nor devices: run first, so a bad value is
one error naming the field and what it expects, before any file is read or written."""

from __future__ import annotations

import math
from pathlib import Path

from fourm.train.mesh import AXES, MeshConfigError, mesh_shape


class ConfigError(ValueError):
    """The config cannot run on these devices / this data. Raised before any compute."""


def _positive_int(config, key: str, minimum: int = 1) -> int:
    node = config
    for part in key.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < minimum:
        raise ConfigError(f"config.{key}={node!r}: expected an integer >= {minimum}")
    return node


def _finite(config, key: str, positive: bool = False, minimum: float | None = None) -> float:
    node = config
    for part in key.split("."):
        node = node[part]
    try:
        value = float(node)
    except (TypeError, ValueError):
        raise ConfigError(f"config.{key}={node!r}: expected a number") from None
    if not math.isfinite(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
        want = "a positive finite number" if positive else (
            f"a finite number >= {minimum}" if minimum is not None else "a finite number")
        raise ConfigError(f"config.{key}={node!r}: expected {want}")
    return value


def check_config(config, num_devices: int | None = None) -> None:
    """Steps, batch, learning rates, optimizer settings and the data folder; with `num_devices`
    also that the global batch splits over the mesh's data-parallel devices."""
    _positive_int(config, "num_train_steps")
    batch = _positive_int(config, "batch_size")
    accum = _positive_int(config, "grad_accum")
    if batch % accum:
        raise ConfigError(f"config.batch_size={batch} is not divisible by config.grad_accum={accum}")
    _finite(config, "optim.lr", positive=True)
    _finite(config, "optim.min_lr", minimum=0.0)
    _positive_int(config, "optim.warmup_steps", minimum=0)
    for key in ("optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "optim.clip_grad"):
        _finite(config, key, minimum=0.0)
    for key in ("log_every", "ckpt_every", "keep_checkpoints"):
        _positive_int(config, key)
    _positive_int(config, "eval_every", minimum=0)
    if config.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ConfigError(f"config.nonfinite={config.nonfinite!r}: expected 'stop' or 'skip'")
    if not config.model.modalities:
        raise ConfigError("config.model.modalities is empty: name at least one modality")
    for key in ("dir", "eval_dir"):
        path = config.data.get(key, "")
        if key == "dir" and not path:
            raise ConfigError("config.data.dir is empty: point it at pre-tokenized shards "
                              "(a fourm pretokenize output folder)")
        if path and not Path(path).is_dir():
            raise ConfigError(f"config.data.{key}={path!r}: no such directory (expected a fourm "
                              "pretokenize output folder with manifest.json)")
        if path and not (Path(path) / "manifest.json").is_file():
            raise ConfigError(f"config.data.{key}={path!r}: no manifest.json there (expected a "
                              "fourm pretokenize output folder)")
    single_slice = all(int(config.mesh.get(f"dcn_{a}", 1)) == 1 for a in AXES)
    if num_devices is not None and single_slice:
        try:
            ici, dcn = mesh_shape(config.mesh, num_devices)
        except MeshConfigError as e:
            raise ConfigError(f"config.mesh: {e}") from None
        dp = math.prod(ici[AXES.index(a)] * dcn[AXES.index(a)] for a in ("data", "fsdp"))
        if (batch // accum) % dp:
            raise ConfigError(
                f"config.batch_size={batch} (per micro-batch {batch // accum}) is not divisible by the "
                f"data-parallel size {dp} (config.mesh data x fsdp on {num_devices} devices); use a "
                f"multiple of {dp}")
