"""`ImageTokenizer`: the runtime face of a trained image-like tokenizer.

    tok = fourm.tokenizers.runs.from_run("runs/tokenizers/tok_depth@64")   # or fourm.tokenizers.load(dir)
    ids = tok.encode(depth_batch)        # float32[B, 64, 64] metres -> int32[B, 8, 8]
    depth = tok.decode(ids)              # -> float32[B, 64, 64] metres

Encode and decode are pure functions of (weights, array) - `encode_fn`/`decode_fn` below - which the
class jits and `fourm.tokenizers.export` serialises with `jax.export`. Inputs are checked in Python
first (shape, channels, dtype, token range) so errors name expected vs got.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fourm.tokenizers.codecs import Codec, make_codec
from fourm.tokenizers.quantizers import Codebook, codebook_size_of
from fourm.tokenizers.recipes import tokenizer_section
from fourm.tokenizers.vqvae import VQVAE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of checkpoints' tokenizer.json and exported artifacts
WEIGHTS = (nnx.Param, Codebook)  # what inference needs (EMA statistics are training-only)


# ---------------------------------------------------------------------------------------------
# Config identity
# ---------------------------------------------------------------------------------------------
def config_hash(cfg) -> str:
    """Stable hash of the tokenizer fields of a config (what the weights depend on)."""
    blob = json.dumps(tokenizer_section(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(flat: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(flat):
        a = np.ascontiguousarray(flat[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def config_diff(expected: dict, got: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two tokenizer sections."""
    out = []
    for k in sorted(set(expected) | set(got)):
        a, b = expected.get(k, "<missing>"), got.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint has {a!r}, config has {b!r}")
    return out


def check_same_tokenizer(stored: dict, cfg, where: str) -> None:
    """Raise if `cfg`'s tokenizer fields contradict the `stored` ones (e.g. a checkpoint's)."""
    diff = config_diff(stored, tokenizer_section(cfg))
    if diff:
        raise ValueError(f"tokenizer config contradicts {where}:\n  " + "\n  ".join(diff))


# ---------------------------------------------------------------------------------------------
# Model structure and weights <-> flat dicts
# ---------------------------------------------------------------------------------------------
def build_model(cfg, seed: int = 0) -> tuple[Codec, VQVAE]:
    codec = make_codec(cfg)
    return codec, VQVAE(cfg, codec.in_channels, codec.out_channels, rngs=nnx.Rngs(seed))


# Abstract models by config: tracing a VQ-VAE's construction costs ~0.1-0.3 s, and loading one
# tokenizer needs its structure three times (checkpoint target, weights, pure functions).
_ABSTRACT: dict[str, tuple[Codec, VQVAE]] = {}


def abstract_vqvae(cfg) -> tuple[Codec, VQVAE]:
    """(codec, the VQ-VAE of `cfg` as shapes only), built once per config and process. The module
    is shared: split or merge it, never mutate it."""
    cfg = cfg if isinstance(cfg, ml_collections.ConfigDict) else ml_collections.ConfigDict(cfg)
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=repr)
    if key not in _ABSTRACT:
        codec = make_codec(cfg)
        _ABSTRACT[key] = codec, nnx.eval_shape(
            lambda: VQVAE(cfg, codec.in_channels, codec.out_channels, rngs=nnx.Rngs(0)))
    return _ABSTRACT[key]


def abstract_model(cfg):
    """(codec, graphdef, abstract weights, abstract EMA state) without allocating anything."""
    codec, model = abstract_vqvae(cfg)
    graphdef, weights, rest = nnx.split(model, WEIGHTS, ...)
    return codec, graphdef, weights, rest


def flatten(state) -> dict[str, np.ndarray]:
    """nnx.State (or nested dict) -> {"encoder/blocks/0/0/conv1/kernel": array}."""
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + "/")
            else:
                out[key] = v
    walk(pure, "")
    return out


def unflatten_into(abstract, flat: dict, where: str):
    """Flat weights -> nnx.State shaped like `abstract`; missing/extra/mis-shaped keys raise."""
    expected = {k: v for k, v in flatten(abstract).items()}
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    bad = [f"{k}: expected {tuple(expected[k].shape)} {expected[k].dtype}, got "
           f"{tuple(np.shape(flat[k]))} {np.asarray(flat[k]).dtype}"
           for k in sorted(set(expected) & set(flat))
           if tuple(np.shape(flat[k])) != tuple(expected[k].shape)]
    if missing or extra or bad:
        lines = ([f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}"] if missing else []) + \
                ([f"unexpected: {extra[:8]}{' ...' if len(extra) > 8 else ''}"] if extra else []) + bad[:8]
        raise ValueError(f"weights in {where} do not match the tokenizer config:\n  " + "\n  ".join(lines))
    nested: dict = {}
    for k, v in flat.items():
        node = nested
        *parents, leaf = [int(p) if p.isdigit() else p for p in k.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v, expected[k].dtype)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, nested)
    return state


# ---------------------------------------------------------------------------------------------
# Pure encode / decode (jitted here, exported by fourm.tokenizers.export)
# ---------------------------------------------------------------------------------------------
def make_pure_fns(cfg) -> tuple[Callable, Callable]:
    """`encode(weights, x) -> (ids int32[B,gh,gw], invalid int32[B])`, `decode(weights, ids) -> native`.

    `weights` is an nnx.State of the inference weights. Inputs are native arrays already checked.
    """
    codec, graphdef, _, rest_abs = abstract_model(cfg)

    def model_of(weights):
        # EMA statistics are unused at inference; zeros stand in (and are dead code to XLA).
        rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest_abs)
        return nnx.merge(graphdef, weights, rest)

    def encode(weights, x):
        xin, valid = codec.to_input(x)
        ids = model_of(weights).encode_ids(xin)
        return ids, jnp.sum(~valid, axis=(1, 2)).astype(jnp.int32)

    def decode(weights, ids):
        return codec.from_output(model_of(weights).decode_ids(ids.astype(jnp.int32)))

    return encode, decode


class ImageTokenizer:
    """A trained image-like tokenizer: `encode` native batches to token grids and `decode` back."""

    kind = "grid"  # fourm.tokenizer_protocol

    def __init__(self, cfg, weights, *, step: int | None = None, source: str = "",
                 chunk_size: int = 64):
        self.cfg = cfg if isinstance(cfg, ml_collections.ConfigDict) else \
            ml_collections.ConfigDict(cfg)
        self.codec, _, abstract, _ = abstract_model(self.cfg)
        if isinstance(weights, dict):
            weights = unflatten_into(abstract, weights, source or "weights")
        self.weights = weights
        self.step = step
        self.source = source
        self.modality = str(self.cfg.modality)
        self.name = f"{self.cfg.name}@{self.cfg.resolution}"
        self.resolution = int(self.cfg.resolution)
        self.grid = (int(self.cfg.grid), int(self.cfg.grid))
        self.vocab_size = codebook_size_of(self.cfg.quantizer)
        self.config_hash = config_hash(self.cfg)
        self._set_identity()
        self.chunk_size = int(chunk_size)
        enc, dec = make_pure_fns(self.cfg)
        self._encode = jax.jit(enc)
        self._decode = jax.jit(dec)

    def _set_identity(self):
        self.weights_digest = weights_digest(self.flat_weights())
        # Identity of these exact weights under this config: pre-tokenized data records it.
        self.version = f"{self.name}:{self.config_hash[:8]}:{self.weights_digest[:8]}"

    def with_weights(self, weights, *, step: int | None = None) -> "ImageTokenizer":
        """A copy with other weights of the same structure, sharing the compiled functions."""
        new = copy.copy(self)
        new.weights, new.step = weights, step
        new._set_identity()
        return new

    def __repr__(self):
        return (f"ImageTokenizer({self.name}, vocab={self.vocab_size}, grid={self.grid}, "
                f"step={self.step}, version={self.version})")

    @property
    def resize_input(self) -> bool:
        return bool(self.cfg.get("resize_input", False))

    def flat_weights(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in flatten(self.weights).items()}

    def spec(self) -> dict:
        """The tokenizer's self-description (written into exports and pre-tokenized manifests)."""
        return {
            "format_version": FORMAT_VERSION, "version": self.version, "name": self.name,
            "modality": self.modality, "resolution": self.resolution, "grid": list(self.grid),
            "vocab_size": self.vocab_size, "config_hash": self.config_hash,
            "weights_digest": self.weights_digest, "step": self.step,
            "quantizer": tokenizer_section(self.cfg)["quantizer"],
            "normalisation": self.codec.normalisation(),
            "input": {"shape": [str(d) for d in self.codec.expected_shape(self.resolution)],
                      "dtype": self.codec.native_desc},
            "tokenizer_config": tokenizer_section(self.cfg),
        }

    # -- chunked, fixed-shape calls (one compilation per chunk size) ---------------------------
    def _chunked(self, fn, x: np.ndarray):
        n = x.shape[0]
        if n == 0:
            raise ValueError(f"{self.name}: empty batch")
        # Chunks of a power-of-two size (<= chunk_size): few distinct shapes, so few compilations.
        size = min(self.chunk_size, 1 << (n - 1).bit_length())
        pending = []
        for i in range(0, n, size):
            part = x[i:i + size]
            pad = size - part.shape[0]
            if pad:  # pad the last chunk so its shape matches the compiled one
                part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            # Dispatch every chunk before fetching any: the device (or XLA's CPU threads) works
            # on chunk i while the host slices and transfers chunk i + 1.
            pending.append((fn(self.weights, part), size - pad))
        outs = [jax.tree.map(lambda a, k=k: a[:k], jax.device_get(res)) for res, k in pending]
        return jax.tree.map(lambda *a: np.concatenate(a), *outs)

    def encode(self, x, *, return_info: bool = False):
        """Native batch -> int32[B, gh, gw] token ids (see the codec for the native contract)."""
        x = self.codec.check(x, self.resolution, allow_resize=self.resize_input)
        ids, invalid = self._chunked(self._encode, x)
        empty = np.flatnonzero(np.asarray(invalid) >= x.shape[1] * x.shape[2])
        if empty.size:  # tokens of nothing: a NaN / blank input, not an image
            raise ValueError(f"{self.name}: image {int(empty[0])} of the batch has no valid pixel "
                             f"(all NaN/inf/out of range); expected {self.codec.native_desc}")
        n_bad = int(invalid.sum())
        if n_bad:
            log.warning("%s: %d invalid pixels (NaN/inf/out-of-domain) in %d of %d images were "
                        "masked before encoding", self.name, n_bad, int((invalid > 0).sum()),
                        len(invalid))
        ids = ids.astype(np.int32)
        return (ids, {"invalid_pixels": invalid}) if return_info else ids

    def check_tokens(self, tokens) -> np.ndarray:
        t = np.asarray(tokens)
        gh, gw = self.grid
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"{self.name}: token ids must be integers, got {t.dtype}")
        if t.ndim == 2 and t.shape[1] == gh * gw:
            t = t.reshape(t.shape[0], gh, gw)
        if t.ndim != 3 or t.shape[1:] != (gh, gw):
            raise ValueError(f"{self.name}: expected token ids [B, {gh}, {gw}] (or [B, {gh * gw}]), "
                             f"got {list(t.shape)}")
        bad = (t < 0) | (t >= self.vocab_size)
        if bad.any():
            raise ValueError(f"{self.name}: {int(bad.sum())} token ids outside [0, {self.vocab_size})"
                             f" (min {int(t.min())}, max {int(t.max())})")
        return t.astype(np.int32)

    def decode(self, tokens) -> np.ndarray:
        """int token ids [B, gh, gw] -> native batch (rgb uint8, depth metres, unit normals, class ids)."""
        return self._chunked(self._decode, self.check_tokens(tokens))

    def reconstruct(self, x) -> np.ndarray:
        return self.decode(self.encode(x))

