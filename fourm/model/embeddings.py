"""Per-modality embeddings: sin-cos position tables, token embeddings, patch projections, heads.

Position tables follow 4M exactly (MoCo-v3 sin-cos):
* 1D (sequences): channels [sin(p w) | cos(p w)], w_i = 10000^(-i / (D/2)); 4M builds 512 rows.
* 2D (grids): channels [sin(a w), cos(a w) | sin(b w), cos(b w)], w_i = 10000^(-i / (D/4)),
  with a = n // H and b = n % H for raster index n (4M's meshgrid(w, h, indexing="ij")).
They are fixed constants (not parameters) with 4M's float32 argument rounding, so converted
checkpoints match its stored buffers to within a few 1e-6. Modalities named in
`learned_pos_emb` get a learned table instead (4M's *_global tokens).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from fourm.modalities import Modality
from fourm.model.layers import param, xavier_bound, uniform


def _omega(n: int) -> np.ndarray:
    # Frequencies exact (float64) then rounded; the products p * w are then rounded to float32 as
    # in 4M, whose tables were built in float32 torch. Its float32 pow/sin differ from any numpy
    # evaluation by up to ~1 ulp of the argument (3e-5 at p ~ 500); this choice stays within
    # 8e-6 of 4M's stored buffers (the converter checks them at 5e-5).
    return (1.0 / (10000.0 ** (np.arange(n, dtype=np.float64) / n))).astype(np.float32)


def _sin_cos(args32: np.ndarray):
    a = args32.astype(np.float64)
    return np.sin(a).astype(np.float32), np.cos(a).astype(np.float32)


@functools.lru_cache(maxsize=64)
def sincos_1d(length: int, dim: int) -> np.ndarray:
    if dim % 2:
        raise ValueError(f"1D sin-cos position embedding needs an even dim, got {dim}")
    out = np.arange(length, dtype=np.float32)[:, None] * _omega(dim // 2)[None, :]
    s, c = _sin_cos(out.astype(np.float32))
    table = np.concatenate([s, c], axis=1)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=64)
def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    n = np.arange(h * w)
    a, b = (n // h).astype(np.float32), (n % h).astype(np.float32)
    om = _omega(dim // 4)
    sa, ca = _sin_cos((a[:, None] * om[None, :]).astype(np.float32))
    sb, cb = _sin_cos((b[:, None] * om[None, :]).astype(np.float32))
    table = np.concatenate([sa, ca, sb, cb], axis=1)
    table.flags.writeable = False
    return table


def pos_table_len(mod: Modality, seq_pos_len: int) -> int:
    if mod.kind == "sequence":
        return max(int(mod.max_length), int(seq_pos_len))
    return mod.num_tokens


def fixed_pos_table(mod: Modality, dim: int, seq_pos_len: int) -> np.ndarray:
    if mod.kind == "sequence":
        return sincos_1d(pos_table_len(mod, seq_pos_len), dim)
    return sincos_2d(mod.grid[0], mod.grid[1], dim)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C), patches in raster order, each flattened (ph, pw, c)
    - 4M's rearrange 'b c (nh ph) (nw pw) -> b (nh nw) (ph pw c)' for channels-last input."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class EncoderEmbedding(nnx.Module):
    """Content embedding of one input modality: token table (grid/sequence) or patch projection."""

    def __init__(self, mod: Modality, spec, learned_pos: bool, rngs: nnx.Rngs):
        d, pd = spec.dim, spec.param_dtype
        self.kind = mod.kind
        if mod.kind == "pixels":
            self.patch = int(mod.patch_size)
            fan_in = self.patch * self.patch * int(mod.channels)
            self.proj = param(uniform(rngs, (fan_in, d), xavier_bound(fan_in, d), pd), ("patch", "embed"))
            self.token_emb = None
        else:
            self.proj = None
            self.token_emb = param(spec.init_std * jax.random.normal(rngs.params(), (mod.vocab_size, d), pd),
                                   ("vocab", "embed"))
        self.pos = (param(spec.init_std * jax.random.normal(
            rngs.params(), (pos_table_len(mod, spec.seq_pos_len), d), pd), ("pos", "embed"))
            if learned_pos else None)


class DecoderEmbedding(nnx.Module):
    """One target modality: output head (V, D), decoder token table for teacher-forced sequences.

    Grid targets are fed the mask token, so they have no decoder token table (4M stores one that
    its forward never reads; the converter drops it by name). With `tie_output_embeddings` the
    head of a sequence modality is its decoder token table (4M's share_embedding)."""

    def __init__(self, mod: Modality, spec, learned_pos: bool, rngs: nnx.Rngs):
        d, pd = spec.dim, spec.param_dtype
        self.kind = mod.kind
        self.tied = bool(spec.tie_output_embeddings)
        table = lambda: param(spec.init_std * jax.random.normal(rngs.params(), (mod.vocab_size, d), pd),  # noqa: E731
                              ("vocab", "embed"))
        self.token_emb = table() if mod.kind == "sequence" else None
        if self.tied and self.token_emb is not None:
            self.to_logits = None
        else:
            # 4M's to_logits is an nn.Linear(D, V) -> xavier uniform.
            self.to_logits = param(uniform(rngs, (mod.vocab_size, d), xavier_bound(d, mod.vocab_size), pd),
                                   ("vocab", "embed"))
        self.pos = (param(spec.init_std * jax.random.normal(
            rngs.params(), (pos_table_len(mod, spec.seq_pos_len), d), pd), ("pos", "embed"))
            if learned_pos else None)

    def head(self) -> nnx.Param:
        return self.token_emb if self.to_logits is None else self.to_logits
