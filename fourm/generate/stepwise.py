"""MaskGIT/ROAR as a host loop over one jitted step, at a few bucketed shapes.

The two loop forms of `maskgit.iterative_decode` trade compile time against run time: unrolled
inside one jit, every step is a distinct exact shape (no padding compute, but S step bodies to
compile); as one `lax.scan`, every step runs at the largest step's shape (one body, padded). Here
the step (`maskgit.grid_step`) is its own jitted program with static sizes (known slots, query
slots), and the S steps are split into at most `buckets` runs of consecutive steps, each run at
one shape (its largest known and largest query count): the split that pads the fewest slots
(`step_sizes`). So a decode compiles at most `buckets` programs, and the padding goes where the
sizes change least. Sizes are multiples of ceil(N / GRID), so calls whose counts differ a little
(other partial conditions, per-sample schedules) still share programs, across steps, calls and
targets of the same shapes.

Every sample's number of known and queried positions per step is known on the host before the
loop (the schedule fixes how many tokens each step commits), so the sizes are plain ints. The
random keys, the per-position sampling noise and the step arithmetic are those of
`iterative_decode`, so for the same rng both give the same tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fourm.generate import maskgit, model_fns
from fourm.generate.sampling import Filter

# step_fn(carry, xs, forced, num_steps, sizes=) -> (carry, trace), jitted with `sizes` static.
StepFn = Callable

# Step programs per decode. MaskGIT-8 RGB -> depth on 4M-T, batch 1 (196 tokens, 2 cores, Dec 7,
# one process, alternating calls; `fourm-bench --only generate --config.generate.loops=...` times
# such a sweep): 4 runs 0.347 s, 5 runs 0.344 s, 6 runs 0.339 s, where the earlier fixed buckets
# (multiples of N/4 on each side, 5 programs) took 0.363 s. 5 keeps that program count.
DEFAULT_BUCKETS = 5
# Sizes are multiples of ceil(N / GRID) slots.
GRID = 32


def bucket(size: int, total: int, grid: int = GRID) -> int:
    """Smallest multiple of ceil(total / grid) that holds `size` (at least one slot, at most total)."""
    quantum = max(math.ceil(total / max(int(grid), 1)), 1)
    return min(max(math.ceil(max(int(size), 1) / quantum), 1) * quantum, max(total, 1))


def split_steps(sizes: list[tuple[int, int]], buckets: int) -> list[tuple[int, int]]:
    """Per-step (known, query) slot counts -> the same list with consecutive steps merged into at
    most `buckets` runs, each at its largest known and largest query count, choosing the runs
    that add the fewest padded slots (known + query, summed over steps; exact dynamic program)."""
    s = len(sizes)
    if s == 0:
        return []
    k = np.array([a for a, _ in sizes], np.int64)
    q = np.array([b for _, b in sizes], np.int64)
    # cost[i, j]: steps i..j as one run, (j - i + 1) * (max k + max q); inf below the diagonal.
    cost = np.full((s, s), np.inf)
    for i in range(s):
        width = np.arange(1, s - i + 1)
        cost[i, i:] = width * (np.maximum.accumulate(k[i:]) + np.maximum.accumulate(q[i:]))
    # best[i]: fewest slots for steps i.. with the runs allowed so far; `cut` remembers run ends.
    best = np.append(cost[:, -1], 0.0)
    cuts = []
    for _ in range(max(int(buckets), 1) - 1):
        total = cost + best[None, 1:]  # run i..j, then the best for j+1..
        cut = np.argmin(total, axis=1)
        cuts.append(cut)
        best = np.append(total[np.arange(s), cut], 0.0)
    out, i = [], 0
    for cut in [*reversed(cuts), np.full(s, s - 1)]:  # a run with all runs allowed, then one fewer
        if i >= s:
            break
        j = int(cut[i])
        out += [(int(k[i:j + 1].max()), int(q[i:j + 1].max()))] * (j - i + 1)
        i = j + 1
    return out


def step_sizes(known: np.ndarray, counts: np.ndarray, scheme: str, buckets: int
               ) -> list[tuple[int, int]]:
    """(known slots, query slots) for every step, from the host-side known mask [B,N] and the
    per-sample schedule counts [B,S]: each covers the largest sample of that step, on the
    ceil(N / GRID) grid, split into at most `buckets` shapes (`split_steps`)."""
    known = np.asarray(known, bool)
    n = known.shape[-1]
    counts = np.broadcast_to(np.asarray(counts), (known.shape[0], np.shape(counts)[-1]))
    done = known.sum(-1)[:, None] + np.cumsum(counts, axis=-1) - counts  # known before step s
    query = n - done if scheme == "maskgit" else counts
    exact = [(bucket(int(k), n), bucket(int(q), n)) for k, q in zip(done.max(0), query.max(0))]
    return split_steps(exact, buckets)


def bucketed_decode(step_fn: StepFn, tokens, known, rng: jax.Array, counts: np.ndarray,
                    temperatures, guidance=None, *, scheme: str = "maskgit", commit_step=None,
                    return_trace: bool = False, buckets: int = DEFAULT_BUCKETS) -> maskgit.GridResult:
    """`maskgit.iterative_decode` with the step loop on the host (same arguments and results;
    `counts` must be host-side, int[S] or int[B,S]). `step_fn` is a jitted
    `maskgit.grid_step` closed over the model and settings, with `sizes` static
    (`jit_step` builds one for a plain logits function)."""
    if scheme not in maskgit.SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {maskgit.SCHEMES}")
    known_host = np.asarray(known, bool)
    b, n = known_host.shape
    counts = np.broadcast_to(np.asarray(counts, np.int32), (b, np.shape(counts)[-1]))
    s_total = counts.shape[-1]
    sizes = step_sizes(known_host, counts, scheme, buckets)
    temperatures = np.broadcast_to(np.asarray(temperatures, np.float32), (s_total,))
    guidance = (np.zeros((s_total, 0), np.float32) if guidance is None
                else np.asarray(guidance, np.float32))
    order_rng, rng = jax.random.split(rng)
    forced = None if commit_step is None else jnp.asarray(commit_step, jnp.int32)
    if scheme == "roar" and forced is None:
        forced = maskgit.roar_commit_steps(order_rng, jnp.asarray(known_host), jnp.asarray(counts))
    keys = jax.random.split(rng, s_total)
    carry = (jnp.asarray(tokens, jnp.int32), jnp.asarray(known_host),
             jnp.full((b, n), -1, jnp.int32))
    traces = []
    for s in range(s_total):
        xs = (np.int32(s), counts[:, s], temperatures[s], guidance[s], keys[s])
        carry, tr = step_fn(carry, xs, forced, np.float32(s_total), sizes=sizes[s])
        traces.append(tr)
    tokens, _, decode_step = carry
    if not return_trace:
        return maskgit.GridResult(tokens, decode_step, None, None)
    return maskgit.GridResult(tokens, decode_step, jnp.stack([t[0] for t in traces]),
                              jnp.stack([t[1] for t in traces]))


def jit_step(compact_logits_fn, *, scheme: str = "maskgit", flt: Filter = Filter(),
             choice_temperature: float = 0.0, return_trace: bool = False,
             compiler_options: dict | None = None) -> StepFn:
    """A jitted step for `bucketed_decode` over a plain compact logits function (tests, fake
    models; see `maskgit.CompactLogitsFn`)."""
    def step(carry, xs, forced, num_steps, sizes):
        return maskgit.grid_step(None, carry, xs, num_steps, compact_logits_fn=compact_logits_fn,
                                 scheme=scheme, flt=flt,
                                   forced=forced,
                                   choice_temperature=choice_temperature,
                                   return_trace=return_trace, sizes=sizes)

    return jax.jit(step, static_argnames=("sizes",), compiler_options=compiler_options)


# ------------------------------------------------------------------------------------------
# The model's step: one jitted program per (model, condition shapes, settings, step shape).
# ------------------------------------------------------------------------------------------
def _model_step(graphdef, state, cond, carry, xs, forced, num_steps, *, name, scheme, flt,
                choice_temperature, return_trace, groups, sizes):
    model = nnx.merge(graphdef, state)

    def compact_logits_fn(tok, kn, query, sizes):
        return model_fns.grid_logits_compact(model, cond, name, tok, kn, query, sizes, groups)

    return maskgit.grid_step(None, carry, xs, num_steps, compact_logits_fn=compact_logits_fn,
                             scheme=scheme, flt=flt,
                             forced=forced, choice_temperature=choice_temperature,
                             return_trace=return_trace, sizes=sizes)


@functools.lru_cache(maxsize=None)
def jitted_model_step(compiler_options: tuple = ()):
    """The jitted model step (one per set of XLA options); `_cache_size()` counts its programs."""
    return jax.jit(_model_step, compiler_options=dict(compiler_options) or None,
                   static_argnames=("graphdef", "name", "scheme", "flt", "choice_temperature",
                                    "return_trace", "groups", "sizes"))


def model_step_fn(jitted, graphdef, state, cond, *, name: str, scheme: str, flt: Filter,
                  choice_temperature: float, return_trace: bool, groups: int) -> StepFn:
    """`bucketed_decode`'s step_fn for target `name` of a split FourM under condition slots `cond`."""
    return functools.partial(jitted, graphdef, state, cond, name=name, scheme=scheme, flt=flt,
                             choice_temperature=choice_temperature, return_trace=return_trace,
                             groups=groups)
