"""Native fourm checkpoints: `config.json` + `model.safetensors` (the layout 4M publishes too).

    save_pretrained(model, cfg, "out/")      # cfg: the experiment config (optional, for record)
    model = load_pretrained("out/")          # FourM with the saved weights, no registry needed

`config.json` holds {"format": "fourm", "version": 1, "model": ModelSpec fields, "modalities":
[Modality fields...], "config": the experiment config or null}. Tensors are keyed by their NNX
state path joined with "/" (e.g. "encoder/attn/qkv", "dec_embed/caption/to_logits"); stacked
blocks keep their leading layer axis. Loading checks every tensor's name and shape: an unknown,
missing or misshapen tensor is an error naming it. Writes are atomic (tmp + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct as _struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fourm.io import inside
from fourm.modalities import Modality

FORMAT, VERSION = "fourm", 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model (names file / tensor)."""


# ---------------------------------------------------------------------------------------------
# safetensors I/O with errors that name the file and tensor
# ---------------------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, __metadata__) of a .safetensors file; truncated or malformed files raise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({len(data)} bytes, no header)")
    (hlen,) = _struct.unpack("<Q", data[:8])
    if 8 + hlen > len(data):
        raise CheckpointError(f"{path}: truncated safetensors file: header of {hlen} bytes but the "
                              f"file has {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + hlen])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + hlen:]
    out = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end > len(body):
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                                  f"{8 + hlen + end} but the file has {len(data)} bytes")
        if end - start != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, shape {shape} "
                                  f"{info['dtype']} needs {nbytes}")
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    return out, dict(meta)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Atomic write of a .safetensors file (no dependency on torch)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, blobs = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        blob = arr.tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # 8-byte alignment of the data section
    atomic_write(Path(path), [_struct.pack("<Q", len(hbytes)), hbytes, *blobs])


def atomic_write(path: Path, chunks) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# flat parameter dicts
# ---------------------------------------------------------------------------------------------


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flat_params(model_or_state) -> dict[str, Any]:
    """{"a/b/c": array} of the model's nnx.Param values."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {_key(p): (v.get_value() if isinstance(v, nnx.Variable) else v) for p, v in leaves}


def assign_params(model: nnx.Module, tensors: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Fill every nnx.Param of `model` from `tensors`; unknown / missing / misshapen = error."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    expected = {_key(p): v for p, v in leaves}
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{source}: parameters missing from the checkpoint: {missing}; "
                              f"checkpoint tensors the model does not have: {unknown}")
    for name, var in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != tuple(var.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, the model "
                                  f"expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(arr, dtype=var.dtype))
    nnx.update(model, state)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _modality_to_json(m: Modality) -> dict:
    d = dataclasses.asdict(m)
    d["grid"] = list(m.grid) if m.grid is not None else None
    return d


def _modality_from_json(d: Mapping[str, Any]) -> Modality:
    fields = {f.name for f in dataclasses.fields(Modality)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise CheckpointError(f"modality entry {d.get('name')!r} has unknown fields {unknown}")
    d = dict(d)
    if d.get("grid") is not None:
        d["grid"] = tuple(d["grid"])
    return Modality(**d)


def save_pretrained(model: nnx.Module, cfg: Any, directory: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` for `model` into `directory` (created)."""
    directory = Path(directory)
    spec = model.spec
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else (dict(cfg) if cfg is not None else None)
    doc = {"format": FORMAT, "version": VERSION, "model": spec.to_config(),
           "modalities": [_modality_to_json(m) for m in spec.modalities], "config": cfg_dict}
    tensors = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(model).items()}
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": FORMAT})
    atomic_write(directory / CONFIG_FILE, [json.dumps(doc, indent=1, sort_keys=True, default=str).encode()])
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    path = inside(directory, CONFIG_FILE, "checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a fourm checkpoint has {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fourm checkpoint (format={doc.get('format')!r}); "
                              f"convert 4M checkpoints with `fourm-ml4m convert`")
    for key in ("model", "modalities"):
        if key not in doc:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return doc


def load_pretrained(directory: str | os.PathLike, overrides: Mapping[str, Any] | None = None):
    """FourM from a fourm checkpoint. `overrides` may change run-time options (dtype, remat,
    scan_layers, head_impl, head_chunk, attention_impl, loss_type) - not the architecture."""
    from fourm.model.fourm_model import FourM
    from fourm.model.spec import ModelSpec

    directory = Path(directory)
    doc = read_config(directory)
    mods = [_modality_from_json(d) for d in doc["modalities"]]
    model_cfg = dict(doc["model"])
    runtime = {"dtype", "param_dtype", "remat", "scan_layers", "head_impl", "head_chunk",
               "attention_impl", "loss_type"}
    for k, v in (overrides or {}).items():
        if k not in runtime:
            raise KeyError(f"load_pretrained override {k!r} is not a run-time option; allowed: {sorted(runtime)}")
        model_cfg[k] = v
    try:
        spec = ModelSpec.from_config(model_cfg, mods)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from e
    model = nnx.eval_shape(lambda: FourM(spec, rngs=nnx.Rngs(0)))
    tensors, _ = read_safetensors(inside(directory, WEIGHTS_FILE, "checkpoint file"))
    assign_params(model, tensors, str(directory / WEIGHTS_FILE))
    return model
