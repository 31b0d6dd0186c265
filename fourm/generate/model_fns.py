"""The model side of the samplers: logits functions and a KV-cached decoder step over `FourM`.

Everything here is a pure function of a merged `FourM` and arrays, meant to run inside one jit
(`chain` closes the samplers over these). Encoder inputs follow `fourm.batch`: the condition
slots are built on the host once per target (`chain.condition_slots`), the target's own slots
(tokens decoded so far / the sequence's given input) are appended here.

Group axis (guidance): the condition slots arrive already stacked G times along the batch
(G*B rows, group g with its removed conditions marked invalid); target slots and decoder
queries are tiled to match and logits come back as (G, B, ...).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from fourm.model import decoding

Arrays = Mapping[str, jax.Array]


def tile_groups(x: jax.Array, groups: int) -> jax.Array:
    """(B, ...) -> (G*B, ...): one copy per guidance group."""
    return x if groups == 1 else jnp.tile(x, (groups,) + (1,) * (x.ndim - 1))


def split_groups(x: jax.Array, groups: int) -> jax.Array:
    """(G*B, ...) -> (G, B, ...) (unchanged without guidance)."""
    return x if groups == 1 else x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


def _first_true(mask: jax.Array, n: int) -> jax.Array:
    """Indices of the first `n` True entries per row (ascending), then False ones to fill."""
    return jnp.argsort(~mask, axis=-1, stable=True)[:, :n].astype(jnp.int32)


def with_target_slots(cond: Arrays, mod_index: int, ids: jax.Array, pos: jax.Array,
                      valid: jax.Array, groups: int) -> dict:
    """Encoder batch = condition slots (G*B rows) + the target's own input slots (B rows, tiled)."""
    out = dict(cond)
    extra = dict(enc_ids=ids.astype(jnp.int32), enc_mod=jnp.full(ids.shape, mod_index, jnp.int32),
                 enc_pos=pos.astype(jnp.int32), enc_valid=valid.astype(bool))
    for k, v in extra.items():
        out[k] = jnp.concatenate([cond[k], tile_groups(v, groups)], axis=1)
    return out


def decoder_slots(mod_index: int, pos: jax.Array, valid: jax.Array, ids: jax.Array | None = None
                  ) -> dict:
    zeros = jnp.zeros(pos.shape, jnp.int32)
    return dict(dec_ids=zeros if ids is None else ids.astype(jnp.int32), dec_targets=zeros,
                dec_mod=jnp.full(pos.shape, mod_index, jnp.int32), dec_pos=pos.astype(jnp.int32),
                dec_valid=valid.astype(bool))


def grid_logits(model, cond: Arrays, name: str, tokens: jax.Array, known: jax.Array,
                query: jax.Array, groups: int = 1) -> jax.Array:
    """Logits (B, N, V) (or (G, B, N, V)) of grid target `name` at the `query` positions.

    Known target positions are encoder inputs; query positions are decoder mask-token queries
    attending to each other only (the other rows are padding and never read)."""
    b, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    enc = with_target_slots(cond, model.spec.index(name), tokens, pos, known, groups)
    return _predict(model, enc, name, pos, query, groups)


def grid_logits_compact(model, cond: Arrays, name: str, tokens: jax.Array, known: jax.Array,
                        query: jax.Array, sizes: tuple[int, int], groups: int = 1
                        ) -> tuple[jax.Array, jax.Array]:
    """`grid_logits` of the Q queried positions only: (logits (.., B, Q, V), positions (B, Q)).

    With static `sizes = (num_known, num_query)` (equal for every sample), the known and queried
    positions are gathered into exactly-sized slots first: the same result with no padding
    compute (what an unrolled MaskGIT uses; its sizes shrink/grow per step)."""
    # At least one slot each, so nothing is zero-sized (an empty one is padding).
    n_known, n_query = max(int(sizes[0]), 1), max(int(sizes[1]), 1)
    kpos = _first_true(known, n_known)
    kids = jnp.take_along_axis(tokens, kpos, axis=1)
    enc = with_target_slots(cond, model.spec.index(name), kids, kpos,
                            jnp.take_along_axis(known, kpos, axis=1), groups)
    qpos = _first_true(query, n_query)
    return _predict(model, enc, name, qpos, jnp.take_along_axis(query, qpos, axis=1), groups), qpos


def _predict(model, enc: Arrays, name: str, qpos: jax.Array, qvalid: jax.Array, groups: int):
    logits = decoding.predict_grid(model, model.encode(enc), name, tile_groups(qpos, groups),
                                   tile_groups(qvalid, groups))  # (G*B, Q, V) float32
    return split_groups(logits, groups)


# ------------------------------------------------------------------------------------------
# Autoregressive decoding with a KV cache (the model's `fourm.model.decoding` entry points).
# ------------------------------------------------------------------------------------------
def seq_prefill(model, enc_batch: Arrays, name: str, max_len: int):
    """Encoder once, cross-attention keys/values of the context once, an empty self-attention
    cache of `max_len` positions. The first `decoding.ar_step` then feeds the start token at
    position 0."""
    enc = model.encode(enc_batch)
    b = enc.valid.shape[0]
    # An empty prefix (length 0): the cache starts at position 0; its one padding row is
    # overwritten by the first step.
    _, cache = decoding.ar_prefill(model, enc, name, jnp.zeros((b, 1), jnp.int32),
                                   jnp.zeros((b,), jnp.int32), max_len)
    return cache


def seq_full_logits(model, enc_batch: Arrays, name: str, ids: jax.Array) -> jax.Array:
    """No-cache reference: the full causal decoder over ids (B, L) at positions 0..L-1, logits
    (B, L, V); row i sees ids[:, :i+1]. The reference implementation's algorithm."""
    b, n = ids.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    dec = decoder_slots(model.spec.index(name), pos, jnp.ones((b, n), bool), ids)
    y = model.decode(model.encode(enc_batch), dec)
    return model.logits(y, name)
