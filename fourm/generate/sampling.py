"""Token sampling and guidance arithmetic: pure functions of logits (and a PRNG key).

* `filter_logits`: top-k / top-p (nucleus) filtering with 4M's semantics (top-p keeps the
  smallest prefix of the sorted distribution whose mass reaches p, always at least one token).
* `sample_tokens`: temperature sampling; temperature 0 = greedy argmax. Temperatures are data
  (per step, traced), top-k / top-p are static settings, so one compiled sampler serves every
  temperature schedule.
* `guide`: classifier-free and multi-modal guidance on logits stacked along a leading group axis,
  `uncond + sum_k w_k (cond_k - uncond)` (weights may be negative: "avoid this condition").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GREEDY_EPS = 1e-10  # a temperature at or below this is greedy (4M's test on temperature == 0)


@dataclasses.dataclass(frozen=True)
class Filter:
    """Static logit filtering. top_k: keep the k largest logits (0 = off; a float in (0, 1) is a
    fraction of the vocabulary). top_p: keep the nucleus of mass p, in (0, 1] (None = off)."""

    top_k: int | float = 0
    top_p: float | None = None

    def __post_init__(self):
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)):
            raise ValueError(f"top_k must be an int >= 0 or a fraction in (0, 1), got {self.top_k!r}")
        if self.top_k < 0 or (isinstance(self.top_k, float) and self.top_k >= 1.0
                              and not float(self.top_k).is_integer()):
            raise ValueError(f"top_k must be an int >= 0 or a fraction in (0, 1), got {self.top_k}")

    def k_for(self, vocab: int) -> int:
        k = self.top_k
        if isinstance(k, float) and 0.0 < k < 1.0:
            k = int(k * vocab)
        return max(0, min(int(k), vocab))


def filter_logits(logits: jax.Array, flt: Filter) -> jax.Array:
    """Set filtered-out logits to -inf (last axis = vocabulary)."""
    vocab = logits.shape[-1]
    k = flt.k_for(vocab)
    if 0 < k < vocab:
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if flt.top_p is not None and flt.top_p < 1.0:
        sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token while the mass *before* it is at most p: the first token that crosses p is
        # kept (so at least one token always survives). The threshold is the smallest kept logit;
        # equal logits at the boundary are kept together (order-independent, unlike index-based).
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) <= flt.top_p
        n_keep = jnp.maximum(keep_sorted.sum(-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array | float,
                  flt: Filter = Filter(), row_ids: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Sample one token per position. Returns (ids int32[...], log-prob of the chosen id).

    The log-prob is taken under the filtered, tempered distribution that was sampled from; for
    greedy steps it is the plain log-softmax of the argmax (a real confidence, where 4M uses a
    constant 1 and so leaves MaskGIT's greedy choice of positions to tie-breaking).

    row_ids (int, the shape of logits without the vocabulary axis): give each row its own noise,
    drawn from fold_in(rng, row_id), so a row's sample does not depend on which other rows are
    in the array (the same draw whether a sampler passes all positions or a compacted subset).
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)

    def greedy(_):
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return ids, log_softmax_at(logits, ids)

    def sample(_):
        # Per-sample temperatures broadcast over the vocabulary; greedy entries divide by 1
        # (their samples are discarded below) to keep the arithmetic finite.
        t = jnp.where(temperature <= GREEDY_EPS, 1.0, temperature)
        scaled = filter_logits(logits, flt) / (t if t.ndim == 0 else t[..., None])
        if row_ids is None:
            u = jax.random.uniform(rng, scaled.shape[:-1])
        else:
            keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids.reshape(-1))
            u = jax.vmap(lambda k: jax.random.uniform(k))(keys).reshape(scaled.shape[:-1])
        return inverse_cdf_sample(scaled, u)

    if temperature.ndim == 0:
        # A scalar temperature picks one branch at run time, so greedy steps skip the filtering
        # and the noise entirely.
        return jax.lax.cond(temperature <= GREEDY_EPS, greedy, sample, None)
    g_ids, g_lp = greedy(None)
    s_ids, s_lp = sample(None)
    is_greedy = temperature <= GREEDY_EPS
    return jnp.where(is_greedy, g_ids, s_ids), jnp.where(is_greedy, g_lp, s_lp)


def inverse_cdf_sample(logits: jax.Array, u: jax.Array, block: int = 128
                       ) -> tuple[jax.Array, jax.Array]:
    """Exact categorical sample per row by inverting the CDF at u ~ U[0, 1) (one random number
    per row, as torch.multinomial does, instead of Gumbel-max's one per vocabulary entry: the
    noise dominated sampling cost on CPU). Two levels - pick a block of `block` ids by the block
    masses, then the id inside it - so the cumulative sums run over V/block + block entries, not
    V. Ids of zero probability (filtered, -inf) are never returned. Returns (ids, log-probs)."""
    shape, v = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, v).astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    p = jnp.exp(x - top)  # unnormalised; filtered entries 0
    nb = -(-v // block)
    p = jnp.pad(p, ((0, 0), (0, nb * block - v))).reshape(-1, nb, block)
    mass = p.sum(-1)  # [R, nb]
    cmass = jnp.cumsum(mass, axis=-1)
    target = u.reshape(-1) * cmass[:, -1]
    # Rounding can put target at or past the total: clamp to the last block / id with mass.
    last_b = nb - 1 - jnp.argmax((mass > 0)[:, ::-1], axis=-1)
    b = jnp.minimum(jnp.sum(cmass <= target[:, None], axis=-1), last_b)
    rows = jnp.arange(p.shape[0])
    pb = p[rows, b]  # [R, block]
    rest = target - (cmass[rows, b] - mass[rows, b])
    last_j = block - 1 - jnp.argmax((pb > 0)[:, ::-1], axis=-1)
    j = jnp.minimum(jnp.sum(jnp.cumsum(pb, axis=-1) <= rest[:, None], axis=-1), last_j)
    # `<=` skips leading zero-mass entries; the clamp keeps the pick on an entry with mass.
    ids = (b * block + j).astype(jnp.int32)
    logp = (jnp.take_along_axis(x, ids[:, None], axis=-1)[:, 0] - top[:, 0]) - jnp.log(cmass[:, -1])
    return ids.reshape(shape), logp.reshape(shape)


def guide(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """Guided logits from a group axis: logits[0] = unconditional, logits[1:] = one pass per guided
    condition set, weights [K] (K = G - 1): uncond + sum_k w_k (cond_k - uncond).

    Classifier-free guidance with scale s is K = 1, weights [s] (s = 1 returns the conditional
    logits unchanged; s = 0 the unconditional). With no group axis to combine (G = 1) the logits
    are returned as they are.
    """
    if logits.shape[0] == 1:
        return logits[0]
    uncond, conds = logits[0], logits[1:]
    weights = jnp.asarray(weights, logits.dtype).reshape((-1,) + (1,) * (logits.ndim - 1))
    if weights.shape[0] != conds.shape[0]:
        raise ValueError(f"guide: {conds.shape[0]} conditional passes but {weights.shape[0]} weights")
    return uncond + jnp.sum(weights * (conds - uncond[None]), axis=0)


def log_softmax_at(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """log softmax(logits)[ids] along the last axis (float32), without materialising the
    log-softmax of the whole vocabulary."""
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)
