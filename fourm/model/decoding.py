"""Decoder entry points for samplers: parallel grid steps and KV-cached autoregressive text.

All functions are pure in (model, arrays) with static shapes, so a sampler jits them once
(`nnx.jit`, or split/merge inside `jax.jit`) and calls them in a loop or `lax.while_loop`.

MaskGIT / ROAR (one image-like target modality per call)::

    enc = model.encode(batch)                       # conditions + tokens decoded so far as inputs
    logits = predict_grid(model, enc, "tok_depth@224", pos, valid)   # (B, Q, V) float32

  Queries are `mask_token + pos_emb[pos] + mod_emb` at the Q positions (padding: valid False);
  they attend to each other bidirectionally (4M's generation uses no decoder mask among the
  queries of one modality) and to every valid encoder row.

Autoregressive sequences (captions, boxes, ...) with a KV cache::

    logits, cache = ar_prefill(model, enc, "caption", ids, lengths, max_len)  # next-token logits
    logits, cache = ar_step(model, cache, next_ids)                           # one token at a time

  The decoder input at position t is `token_emb(ids[t]) + pos_emb[t] + mod_emb`, causal; the
  cross-attention keys/values of the context are computed once in the prefill. This equals 4M's
  re-run of the full decoder over the prefix at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fourm.model import layers
from fourm.model.fourm_model import Encoded, FourM, self_attention_mask


def predict_grid(model: FourM, enc: Encoded, name: str, pos: jax.Array, valid: jax.Array) -> jax.Array:
    """Full logits (B, Q, V_name) at grid positions `pos` (B, Q) of target modality `name`."""
    m = model.spec.modality(name)
    if model.spec.index(name) not in model.spec.targets:
        raise KeyError(f"{name!r} is not a target modality of this model; targets: {list(model.spec.domains_out)}")
    if m.kind == "sequence":
        raise ValueError(f"{name!r} is a sequence modality: decode it with ar_prefill / ar_step")
    valid = valid.astype(bool)
    y = model.mask_token[...].astype(jnp.float32) + model.position_embedding(name, "dec", pos)
    y = jnp.where(valid[..., None], y, 0.0)
    causal = jnp.full(pos.shape, model.spec.decoder_causal)
    self_mask = self_attention_mask(valid, causal)
    out = model.run_decoder(y, model.context(enc), self_mask, enc.valid[:, None, None, :])
    return model.logits(out, name)


@struct.dataclass
class DecodeCache:
    layers: layers.KVCache  # stacked over decoder layers: k, v (L, B, T, H, hd), ck, cv (L, B, S, H, hd)
    ctx_valid: jax.Array  # (B, S)
    length: jax.Array  # (B,) tokens in the cache; the next token goes to position `length`
    name: str = struct.field(pytree_node=False, default="")


def _token_inputs(model: FourM, name: str, ids: jax.Array, pos: jax.Array) -> jax.Array:
    table = model.dec_embed[name].token_emb
    content = jnp.take(table[...].astype(jnp.float32), ids, axis=0, mode="clip")
    return content + model.position_embedding(name, "dec", pos)


def ar_prefill(model: FourM, enc: Encoded, name: str, ids: jax.Array, lengths: jax.Array,
               max_len: int) -> tuple[jax.Array, DecodeCache]:
    """Run the prefix ids (B, T0) (first `lengths[b]` valid) of sequence modality `name`.

    Returns the logits (B, V) predicting the token at position `lengths[b]`, and a cache with room
    for `max_len` tokens in all (T0 <= max_len)."""
    spec = model.spec
    if spec.index(name) not in spec.targets or spec.modality(name).kind != "sequence":
        raise KeyError(f"{name!r} is not a sequence target of this model; targets: {list(spec.domains_out)}")
    bsz, t0 = ids.shape
    if t0 > max_len:
        raise ValueError(f"prefix length {t0} exceeds max_len {max_len}")
    lengths = lengths.astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (bsz, t0))
    valid = pos < lengths[:, None]
    y = jnp.where(valid[..., None], _token_inputs(model, name, ids, pos), 0.0).astype(spec.dtype)
    self_mask = self_attention_mask(valid, jnp.ones((bsz, t0), bool))
    cross_mask = enc.valid[:, None, None, :]
    context = model.context(enc)
    y, kv = layers.run_stack(model.decoder, lambda blk, y, _: blk(y, context, self_mask, cross_mask), y,
                             scan=spec.scan_layers, remat="none")
    y = model.decoder_norm(y)
    last = jnp.take_along_axis(y, jnp.clip(lengths - 1, 0, t0 - 1)[:, None, None], axis=1)[:, 0]
    pad = [(0, 0), (0, 0), (0, max_len - t0), (0, 0), (0, 0)]
    kv = kv.replace(k=jnp.pad(kv.k, pad), v=jnp.pad(kv.v, pad))
    return model.logits(last, name), DecodeCache(kv, enc.valid, lengths, name)


def ar_step(model: FourM, cache: DecodeCache, ids: jax.Array) -> tuple[jax.Array, DecodeCache]:
    """Append token ids (B,) at position `cache.length`; logits (B, V) for the token after it."""
    spec, name = model.spec, cache.name
    bsz, max_len = cache.layers.k.shape[1], cache.layers.k.shape[2]
    pos = cache.length
    y = _token_inputs(model, name, ids[:, None], pos[:, None]).astype(spec.dtype)
    self_mask = self_attention_mask(jnp.ones((bsz, max_len), bool), jnp.ones((bsz, 1), bool), q_pos=pos[:, None])
    cross_mask = cache.ctx_valid[:, None, None, :]
    slot = jnp.minimum(pos, max_len - 1)  # a full cache keeps overwriting its last row

    def layer(blk, y, kv):
        y, kv = blk(y, None, self_mask, cross_mask, cache=kv, write_at=slot)
        return y, (kv.k, kv.v)  # the context keys/values stay as they are: no copy per step

    y, (k, v) = layers.run_stack(model.decoder, layer, y, cache.layers, scan=spec.scan_layers, remat="none")
    logits = model.logits(model.decoder_norm(y)[:, 0], name)
    return logits, cache.replace(layers=cache.layers.replace(k=k, v=v), length=pos + 1)
