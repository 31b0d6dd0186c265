"""A tokenizer training run's folder: its config.json and orbax checkpoints (model = params +
codebook/EMA, optimizer state, JSON metadata), and the `ImageTokenizer` one of them holds.

    tok = from_run("runs/tokenizers/tok_depth@64")          # latest checkpoint
    tok = from_run(workdir, step=200, config=cfg)           # cfg must agree with the run's

Reading a run needs none of the training code (`fourm.tokenizers.train` writes runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from fourm.tokenizers.image import WEIGHTS, ImageTokenizer, abstract_vqvae, check_same_tokenizer
from fourm.tokenizers.recipes import tokenizer_section


def load_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a tokenizer training run")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def checkpoint_manager(workdir: Path, t=None, read_only: bool = False) -> ocp.CheckpointManager:
    # Readers open without creating anything (orbax's read_only mode only adds log noise).
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=int(t.keep_checkpoints) if t else None, create=not read_only)
    return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=opts,
                                 item_names=("model", "opt", "meta"))


def restore_weights(workdir, step: int | None = None, config=None):
    """(config, inference weights as nnx.State, step) of a run's checkpoint."""
    workdir = Path(workdir)
    cfg = load_workdir_config(workdir)
    if config is not None:
        check_same_tokenizer(tokenizer_section(cfg), config, f"the checkpoint in {workdir}")
    mngr = checkpoint_manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else int(step)
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                                f"{workdir / 'checkpoints'} (have {list(mngr.all_steps())})")
    abstract = abstract_vqvae(cfg)[1]
    graphdef, params_abs, rest_abs = nnx.split(abstract, nnx.Param, ...)
    # Explicit target sharding: the checkpoint may come from another device topology (e.g. an
    # 8-device data-parallel run) and is read here onto one local device.
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                          {"params": nnx.to_pure_dict(params_abs), "rest": nnx.to_pure_dict(rest_abs)})
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {workdir} step {step} does not match its config.json "
                         f"tokenizer fields: {e}") from e
    model = nnx.merge(graphdef, restored["model"]["params"], restored["model"]["rest"])
    weights = nnx.split(model, WEIGHTS, ...)[1]
    mngr.close()
    return cfg, weights, step


def from_run(workdir, step: int | None = None, config=None) -> ImageTokenizer:
    """The tokenizer of a training run's latest (or `step`) checkpoint; `config`, if given, must
    agree with the run's."""
    cfg, weights, step = restore_weights(workdir, step=step, config=config)
    return ImageTokenizer(cfg, weights, step=step, source=str(workdir))
