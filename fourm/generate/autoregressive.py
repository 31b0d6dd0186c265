"""Autoregressive decoding of sequence targets with a KV cache, in one `lax.while_loop`.

The model side is a step function over an opaque cache pytree:

    step_fn(cache, token int32[B], pos int32[]) -> (logits float[B,V] | float[G,B,V], cache)

It embeds `token` at target position `pos` (rank within the generated span), attends to the
cached keys/values of positions < pos plus itself, cross-attends to the fixed encoder context,
and returns the next-token logits; a group axis G carries guidance passes (group 0 =
unconditional), combined with `sampling.guide`. The cache has static shapes (a buffer of the
maximum length), so the loop compiles once. `no_cache_step` turns a full causal decoder pass
into a step function with the same signature: the reference's algorithm (re-run the whole decoder
per token), used to test that both paths agree.

Decoding stops for a sample at its first stop token (the closing sentinel or EOS) and for the
batch when every sample has stopped or `max_new_tokens` is reached; positions after a stop hold
`pad_id`. `fourm.text_layout.merge_spans` fills the generated spans back into the input's sentinels.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fourm.generate.sampling import Filter, guide, sample_tokens

StepFn = Callable[[object, jax.Array, jax.Array], tuple[jax.Array, object]]


class SeqResult(NamedTuple):
    tokens: jax.Array  # int32[B,T] generated ids (stop token included), pad_id after it
    length: jax.Array  # int32[B] generated ids up to and including the stop token
    stopped: jax.Array  # bool[B] whether a stop token was produced
    logp: jax.Array  # float32[B,T] log-prob of each generated id (0 after the stop)


def autoregressive_decode(step_fn: StepFn, cache, start_tokens: jax.Array, rng: jax.Array, *,
                          max_new_tokens: int, temperatures: jax.Array | float = 0.0,
                          guidance: jax.Array | None = None, stop_ids: Sequence[int] = (),
                          pad_id: int = 0, flt: Filter = Filter()) -> SeqResult:
    """Generate up to `max_new_tokens` ids after `start_tokens` (int32[B], e.g. [S_1]).

    temperatures: scalar or float[T] per step. guidance: float[K] or float[T,K] weights (only
    when step_fn returns a group axis). Traceable; jit it with step_fn/max_new_tokens/stop_ids/
    pad_id/flt static.
    """
    T = int(max_new_tokens)
    if T < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    start_tokens = jnp.asarray(start_tokens, jnp.int32)
    B = start_tokens.shape[0]
    temps = jnp.broadcast_to(jnp.asarray(temperatures, jnp.float32), (T,))
    if guidance is None:
        guidance = jnp.zeros((0,), jnp.float32)
    guidance = jnp.asarray(guidance, jnp.float32)
    guidance = jnp.broadcast_to(guidance, (T, guidance.shape[-1])) if guidance.ndim == 1 else guidance
    stop = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
    keys = jax.random.split(rng, T)

    def cond(carry):
        t, _, _, done, *_ = carry
        return (t < T) & ~jnp.all(done)

    def body(carry):
        t, cache, last, done, out, logps = carry
        logits, cache = step_fn(cache, last, t)
        if logits.ndim == 3:
            logits = guide(logits, guidance[t])
        ids, logp = sample_tokens(logits, keys[t], temps[t], flt)
        ids = jnp.where(done, pad_id, ids)
        out = out.at[:, t].set(ids)
        logps = logps.at[:, t].set(jnp.where(done, 0.0, logp))
        done = done | jnp.isin(ids, stop)
        return t + 1, cache, ids, done, out, logps

    init = (jnp.int32(0), cache, start_tokens, jnp.zeros((B,), bool),
            jnp.full((B, T), pad_id, jnp.int32), jnp.zeros((B, T), jnp.float32))
    t, _, _, done, out, logps = jax.lax.while_loop(cond, body, init)
    is_stop = jnp.isin(out, stop)
    first_stop = jnp.argmax(is_stop, axis=-1)
    length = jnp.where(done, first_stop + 1, t).astype(jnp.int32)
    return SeqResult(out, length, done, logps)


def no_cache_step(full_fn: Callable[[jax.Array], jax.Array], batch: int, max_len: int,
                  pad_id: int = 0) -> tuple[StepFn, jax.Array]:
    """A step function that re-runs a full causal pass: full_fn(ids int32[B,L]) -> float[(G,)B,L,V]
    with L = max_len, whose row i sees ids[:, :i+1] only. Returns (step_fn, initial cache), the
    cache being the id buffer. Same results as a KV cache, O(L) times the work per token."""

    def step_fn(buf, token, pos):
        buf = buf.at[:, pos].set(token)
        logits = full_fn(buf)
        return jnp.take(logits, pos, axis=-2), buf

    return step_fn, jnp.full((batch, max_len), pad_id, jnp.int32)
