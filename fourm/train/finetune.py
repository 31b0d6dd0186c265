"""Starting a run from pretrained weights: `config.init` (fine-tuning, new modalities, frozen parts).

    config.init.checkpoint = "runs/quickstart/pretrain/export"   # a fourm export, or an official
                                                                  # 4M folder (converted on load)
    config.init.freeze = ("encoder/*",)    # parameter-name globs whose values stay as loaded
    config.init.new_lr = 3e-3              # peak lr of parameters the checkpoint lacks (0 = optim.lr)

Parameters are named by their path, "/"-joined as in fourm exports ("encoder/attn/qkv",
"dec_embed/det/to_logits", "mod_emb/det"; `fourm.train.finetune.param_names(model)` lists them).
A parameter the checkpoint has with the same shape is loaded; one it lacks (a new modality's
embeddings and head) starts fresh and is named in the log; a checkpoint tensor the model does not
use (a modality dropped) is named and ignored; any shape or architecture difference is one error
listing all of them. The optimizer always starts fresh. The trainer records the outcome
(`InitPlan`) in `workdir/init.json` at the first start, and a resumed run rebuilds its optimizer
from that record and its state from its own checkpoints: the init checkpoint is never read again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from fourm.compat import ml4m
from fourm.io import read_json_object
from fourm.model import pretrained

log = logging.getLogger("fourm.train")

# Model fields that must agree between the checkpoint and the config (the rest - dtypes, remat,
# head implementation - are run-time choices).
ARCH_KEYS = ("dim", "encoder_depth", "decoder_depth", "num_heads", "mlp_hidden", "act", "gated_mlp",
             "qkv_bias", "proj_bias", "mlp_bias", "norm_bias", "qk_norm", "num_register_tokens",
             "share_modality_embeddings", "tie_output_embeddings", "decoder_causal")
RECORD_FILE = "init.json"


class InitError(ValueError):
    """The init checkpoint does not fit the configured model (lists every difference)."""


def param_name(path) -> str:
    """"a/b/c" of a params-tree path (nnx.State paths end in the Variable's `.value`)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def param_shapes(params) -> dict[str, tuple[int, ...]]:
    return {param_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def param_names(model_or_params) -> list[str]:
    """The names `config.init.freeze` patterns match, for a model or its params tree."""
    from flax import nnx

    params = nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module) else model_or_params
    return sorted(param_shapes(params))


# ------------------------------------------------------------------------------------------------
# reading checkpoints (fourm export or official 4M folder)
# ------------------------------------------------------------------------------------------------
def checkpoint_kind(directory: str | Path) -> str:
    """"fourm" (config.json with format fourm) or "ml4m" (4M's FM config.json)."""
    doc = read_json_object(Path(directory) / "config.json", InitError,
                           f"does not exist (config.init.checkpoint={str(directory)!r}: expected a fourm "
                           f"export or an official 4M folder, config.json + model.safetensors)")
    return "fourm" if doc.get("format") == pretrained.FORMAT else "ml4m"


def read_checkpoint(directory: str | Path) -> tuple[dict[str, np.ndarray], dict, str]:
    """(tensors by fourm parameter name, the checkpoint's model config, kind)."""
    directory = Path(directory)
    kind = checkpoint_kind(directory)
    try:
        if kind == "fourm":
            doc = pretrained.read_config(directory)
            tensors, _ = pretrained.read_safetensors(directory / pretrained.WEIGHTS_FILE)
            return tensors, dict(doc["model"]), kind
        cfg = ml4m.read_ml4m_config(directory)
        spec = ml4m.spec_from_ml4m(cfg, str(directory / "config.json"), verbose=False)
        raw, meta = pretrained.read_safetensors(directory / ml4m.WEIGHTS_FILE)
        tensors, _ = ml4m.convert_state_dict(raw, meta, spec, str(directory / ml4m.WEIGHTS_FILE))
        return tensors, spec.to_config(), kind
    except pretrained.CheckpointError as e:
        raise InitError(f"config.init.checkpoint: {e}") from None


def read_init_tensors(directory: str | Path) -> dict[str, np.ndarray]:
    return read_checkpoint(directory)[0]


# ------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InitPlan:
    source: str  # absolute path of the checkpoint folder
    kind: str  # fourm | ml4m
    loaded: tuple[str, ...]  # parameters taken from the checkpoint
    new: tuple[str, ...]  # parameters the checkpoint lacks: fresh initialisation
    unused: tuple[str, ...]  # checkpoint tensors the model has no place for
    frozen: tuple[str, ...] = ()  # parameters never updated
    freeze: tuple[str, ...] = ()  # the patterns that chose them

    def with_freeze(self, patterns: Sequence[str], abstract_params) -> "InitPlan":
        """Frozen parameter names for `patterns` (fnmatch globs over parameter names)."""
        patterns = tuple(str(p) for p in patterns)
        names = sorted(param_shapes(abstract_params))
        frozen, empty = set(), []
        for pat in patterns:
            hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hit:
                empty.append(pat)
            frozen.update(hit)
        if empty:
            raise InitError(f"config.init.freeze: patterns {empty} match no parameter; names look like "
                            f"{names[:6]} (fnmatch globs, e.g. 'encoder/*'); all names: "
                            f"fourm.train.finetune.param_names(model)")
        fresh = sorted(frozen & set(self.new))
        if fresh:
            raise InitError(f"config.init.freeze: {fresh} are not in the checkpoint {self.source}; "
                            f"frozen they would stay at their random initialisation")
        return dataclasses.replace(self, frozen=tuple(sorted(frozen)), freeze=patterns)

    def label(self, name: str) -> str:
        return "frozen" if name in self.frozen else "new" if name in self.new else "pretrained"

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "InitPlan":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def summary(self) -> str:
        return (f"initialised from {self.kind} checkpoint {self.source}: {len(self.loaded)} parameters "
                f"loaded, {len(self.new)} new (fresh init): {list(self.new)}; checkpoint tensors "
                f"unused: {list(self.unused)}; frozen: {len(self.frozen)} "
                f"(patterns {list(self.freeze)})")


def match(source: str, kind: str, ckpt_shapes: Mapping[str, tuple], ckpt_model: Mapping[str, Any],
          model_shapes: Mapping[str, tuple], spec) -> InitPlan:
    """InitPlan, or InitError listing every architecture field and parameter shape that differs."""
    ours = spec.to_config()
    diffs = [f"model.{k}: checkpoint {ckpt_model.get(k)!r}, config {ours.get(k)!r}"
             for k in ARCH_KEYS if k in ckpt_model and ckpt_model.get(k) != ours.get(k)]
    shared = sorted(set(model_shapes) & set(ckpt_shapes))
    diffs += [f"{n}: checkpoint shape {tuple(ckpt_shapes[n])}, model {tuple(model_shapes[n])}"
              for n in shared if tuple(ckpt_shapes[n]) != tuple(model_shapes[n])]
    if diffs:
        raise InitError(f"config.init.checkpoint={source!r} does not fit the configured model "
                        f"({len(diffs)} differences): " + "; ".join(diffs))
    return InitPlan(source=source, kind=kind, loaded=tuple(shared),
                    new=tuple(sorted(set(model_shapes) - set(ckpt_shapes))),
                    unused=tuple(sorted(set(ckpt_shapes) - set(model_shapes))))


def inspect_init(directory: str | Path, abstract_params, spec) -> InitPlan:
    source = str(Path(directory).absolute())
    tensors, ckpt_model, kind = read_checkpoint(directory)
    return match(source, kind, {k: v.shape for k, v in tensors.items()}, ckpt_model,
                 param_shapes(abstract_params), spec)


def param_labels(init: InitPlan):
    """params -> tree of "pretrained" | "new" | "frozen" (for optax.multi_transform)."""
    return lambda params: jax.tree_util.tree_map_with_path(lambda p, _: init.label(param_name(p)), params)


def load_into(state: dict, tensors: Mapping[str, np.ndarray], init: InitPlan) -> dict:
    """`state` with the checkpoint's values in the loaded parameters, placed like the fresh ones."""
    loaded = set(init.loaded)

    def put(path, leaf):
        name = param_name(path)
        if name not in loaded:
            return leaf
        arr = np.asarray(tensors[name]).astype(leaf.dtype)
        return jax.make_array_from_callback(arr.shape, leaf.sharding, lambda idx: arr[idx])

    return {**state, "params": jax.tree_util.tree_map_with_path(put, state["params"])}


# ------------------------------------------------------------------------------------------------
# the workdir record
# ------------------------------------------------------------------------------------------------
def write_record(workdir: Path, init: InitPlan) -> None:
    from fourm.io import atomic_write_json

    atomic_write_json(Path(workdir) / RECORD_FILE, init.to_json())


def read_record(workdir: Path) -> InitPlan | None:
    path = Path(workdir) / RECORD_FILE
    if not path.is_file():
        return None
    return InitPlan.from_json(json.loads(path.read_text()))
