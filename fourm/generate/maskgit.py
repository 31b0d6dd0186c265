"""Iterative parallel decoding of image-like targets: MaskGIT and ROAR, one `lax.scan` over steps.

The sampler is a pure function of (logits function, state, schedule arrays, PRNG key). The
logits function hides the model:

    logits_fn(tokens int32[B,N], known bool[B,N], query bool[B,N]) -> float[B,N,V] | float[G,B,N,V]

`known` are the target positions already decoded (or given): the model feeds them to the encoder
as inputs. `query` are the positions the decoder predicts this step (the others are padding, never
attended to). A leading group axis G means guidance: group 0 is the unconditional pass, groups
1..K the guided condition sets, combined with per-step weights (`sampling.guide`).

Schemes:
  maskgit  query every unknown position, sample all of them, commit the `counts[s]` most confident
           (log-prob of the sampled token, optionally plus annealed Gumbel noise: MaskGIT's
           "choice temperature"); the rest are re-masked for the next step.
  roar     random order, accept all: a random permutation of the unknown positions is cut by the
           schedule; step s queries exactly its chunk and keeps every prediction.

`commit_step` (int32[B,N], optional) forces which step commits each position (MaskGIT with a
replayed order, e.g. to compare with a reference whose greedy choice among tied candidates is
arbitrary). Known positions are never queried, never overwritten.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fourm.generate.sampling import Filter, guide, sample_tokens

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
SCHEMES = ("maskgit", "roar")


class GridResult(NamedTuple):
    tokens: jax.Array  # int32[B,N] final tokens (given ones unchanged)
    decode_step: jax.Array  # int32[B,N] step that committed each position; -1 = given
    trace_ids: jax.Array | None  # int32[S,B,N] prediction at every queried position (-1 elsewhere)
    trace_logp: jax.Array | None  # float32[S,B,N] log-prob of that prediction (0 elsewhere)


def _rank_desc(score: jax.Array) -> jax.Array:
    """Rank of each entry when sorted by descending score (ties: lower index first)."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def roar_commit_steps(rng: jax.Array, known: jax.Array, counts: jax.Array) -> jax.Array:
    """Random-order commit step per position: a random permutation of the unknown positions,
    cut into consecutive chunks of `counts[b, s]`. Known positions get -1."""
    noise = jax.random.uniform(rng, known.shape)
    rank = _rank_desc(jnp.where(known, -1.0, noise))  # unknown first, in random order
    ends = jnp.cumsum(counts, axis=-1)  # [B,S]
    step = jnp.sum(rank[..., None] >= ends[:, None, :], axis=-1).astype(jnp.int32)
    return jnp.where(known, -1, step)


def _select(scheme: str, step, ids_logp, known, count, forced, rng, choice_temperature, frac):
    ids, logp = ids_logp
    if forced is not None:
        return (forced == step) & ~known
    if scheme == "roar":  # pragma: no cover - roar always goes through `forced`
        raise AssertionError
    conf = logp
    if choice_temperature > 0:
        # MaskGIT's annealed randomness in *which* positions are kept (not which tokens).
        conf = conf + choice_temperature * (1.0 - frac) * jax.random.gumbel(rng, conf.shape)
    conf = jnp.where(known, -jnp.inf, conf)
    return (_rank_desc(conf) < count[:, None]) & ~known


def iterative_decode(logits_fn: LogitsFn, tokens: jax.Array, known: jax.Array, rng: jax.Array,
                     counts: jax.Array, temperatures: jax.Array, guidance: jax.Array | None = None,
                     *, scheme: str = "maskgit", flt: Filter = Filter(),
                     commit_step: jax.Array | None = None, choice_temperature: float = 0.0,
                     return_trace: bool = False, num_known: int | None = None) -> GridResult:
    """Decode the unknown positions of `tokens` in len(counts) steps (see module docstring).

    counts: int[S] or int[B,S] tokens committed per step (sum = unknown positions per sample).
    temperatures: float[S]. guidance: float[S,K] weights when logits_fn returns a group axis.

    Two loop forms, same results: by default one `lax.scan` over steps (one compiled step body,
    padded shapes). With `num_known` (the number of known positions, equal for every sample) and
    host-side `counts` of shape [S], the steps are unrolled instead and each calls
    `logits_fn(..., sizes=(num_known_now, num_query_now))` with exact static sizes, so the model
    never computes padding (the encoder grows and the decoder shrinks as tokens are committed);
    logits_fn then returns (logits [(G,)B,Q,V], positions int[B,Q]) for the Q queried positions.
    Sampling noise is drawn per (sample, position), so both forms draw the same tokens.
    Traceable: wrap in `jax.jit` with logits_fn and the keyword settings static.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    tokens = jnp.asarray(tokens, jnp.int32)
    known = jnp.asarray(known, bool)
    B, N = tokens.shape
    static_counts = None
    if num_known is not None:
        if not isinstance(counts, np.ndarray) or counts.ndim != 1:
            raise ValueError("unrolled decoding (num_known given) needs host-side counts of shape [S]")
        static_counts = counts.astype(np.int64)
        if int(static_counts.sum()) != N - int(num_known):
            raise ValueError(f"counts sum to {int(static_counts.sum())} but {N - int(num_known)} "
                             f"positions are unknown")
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (B, jnp.shape(counts)[-1]))
    S = counts.shape[-1]
    temperatures = jnp.broadcast_to(jnp.asarray(temperatures, jnp.float32), (S,))
    if guidance is None:
        guidance = jnp.zeros((S, 0), jnp.float32)
    guidance = jnp.asarray(guidance, jnp.float32)
    order_rng, rng = jax.random.split(rng)
    if scheme == "roar" and commit_step is None:
        commit_step = roar_commit_steps(order_rng, known, counts)
    forced = None if commit_step is None else jnp.asarray(commit_step, jnp.int32)

    def body(carry, xs, sizes=None):
        return grid_step(logits_fn, carry, xs, S, scheme=scheme, flt=flt, forced=forced,
                           choice_temperature=choice_temperature, return_trace=return_trace,
                           sizes=sizes)

    xs = (jnp.arange(S, dtype=jnp.int32), counts.T, temperatures, guidance,
          jax.random.split(rng, S))
    carry = (tokens, known, jnp.full(tokens.shape, -1, jnp.int32))
    if static_counts is None:
        carry, trace = jax.lax.scan(body, carry, xs)
    else:
        traces, done = [], int(num_known)
        for s in range(S):
            n_query = N - done if scheme == "maskgit" else int(static_counts[s])
            carry, tr = body(carry, jax.tree.map(lambda a: a[s], xs), sizes=(done, n_query))
            traces.append(tr)
            done += int(static_counts[s])
        trace = jax.tree.map(lambda *a: jnp.stack(a), *traces) if return_trace else None
    tokens, _, decode_step = carry
    if return_trace:
        return GridResult(tokens, decode_step, trace[0], trace[1])
    return GridResult(tokens, decode_step, None, None)


def grid_step(logits_fn: LogitsFn, carry, xs, num_steps, *, scheme: str, flt: Filter,
              forced: jax.Array | None, choice_temperature: float, return_trace: bool,
              sizes: tuple[int, int] | None = None):
    """One MaskGIT/ROAR step: carry (tokens, known, decode_step), xs (step, count[B], temperature,
    guidance weights[K], key) -> (carry, (trace ids, trace log-probs) or None).

    The body of `iterative_decode`'s loop, and the whole of a bucketed step
    (`fourm.generate.stepwise`): `sizes` = static (known slots, query slots), each at least the
    largest count of any sample this step (padding slots are invalid and never read)."""
    tokens, known, decode_step = carry
    step, count, temp, weights, key = xs
    B, N = tokens.shape
    sample_key, choice_key = jax.random.split(key)
    query = ~known if scheme == "maskgit" else (forced == step) & ~known
    rows = jnp.arange(B, dtype=jnp.int32)[:, None] * N  # noise row id = b * N + position
    if sizes is None:
        logits = logits_fn(tokens, known, query)
        qpos = None
    else:  # compact: logits of the queried positions only, and which positions they are
        logits, qpos = logits_fn(tokens, known, query, sizes=sizes)
    if logits.ndim == 4:
        logits = guide(logits, weights)
    pos = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)) if qpos is None else qpos
    ids, logp = sample_tokens(logits, sample_key, temp, flt, row_ids=rows + pos)
    if qpos is not None:
        bidx = jnp.arange(B)[:, None]
        ids = jnp.zeros((B, N), jnp.int32).at[bidx, qpos].set(ids)
        logp = jnp.zeros((B, N), jnp.float32).at[bidx, qpos].set(logp)
    frac = step.astype(jnp.float32) / num_steps
    select = _select(scheme, step, (ids, logp), known, count, forced, choice_key,
                     choice_temperature, frac)
    tokens = jnp.where(select, ids, tokens)
    decode_step = jnp.where(select, step, decode_step)
    carry = (tokens, known | select, decode_step)
    trace = (jnp.where(query, ids, -1), jnp.where(query, logp, 0.0)) if return_trace else None
    return carry, trace


def check_counts(counts: np.ndarray, known: np.ndarray) -> None:
    """Host-side check that each sample's schedule decodes exactly its unknown positions."""
    counts = np.asarray(counts)
    unknown = (~np.asarray(known, bool)).sum(-1)
    totals = counts.sum(-1) if counts.ndim == 2 else np.full_like(unknown, counts.sum())
    if (counts < 0).any():
        raise ValueError(f"token schedule has negative counts: {counts.tolist()}")
    bad = np.nonzero(totals != unknown)[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"token schedule decodes {int(totals[b])} tokens but sample {b} has "
                         f"{int(unknown[b])} unknown positions")


def check_commit_step(commit_step: np.ndarray, known: np.ndarray, counts: np.ndarray) -> None:
    """A forced commit order must commit, at each step, exactly the scheduled number of unknown
    positions, and never a known one."""
    commit_step = np.asarray(commit_step)
    known = np.asarray(known, bool)
    counts = np.broadcast_to(np.asarray(counts), (known.shape[0], np.shape(counts)[-1]))
    if (commit_step[known] != -1).any() or (commit_step[~known] < 0).any():
        raise ValueError("commit_step must be -1 exactly at known positions and >= 0 elsewhere")
    per_step = np.stack([(commit_step == s).sum(-1) for s in range(counts.shape[1])], axis=-1)
    if not np.array_equal(per_step, counts):
        raise ValueError(f"commit_step commits {per_step.tolist()} tokens per step, "
                         f"schedule says {counts.tolist()}")
