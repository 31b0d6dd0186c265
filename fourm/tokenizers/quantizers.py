"""Quantizers for the image-like tokenizers: cosine VQ with an EMA codebook, and FSQ.

Both map encoder latents `z[..., D]` to token ids and to the quantized latents the decoder sees,
with straight-through gradients. The VQ codebook is *not* trained by gradients: it follows an
exponential moving average of the (L2-normalised) latents assigned to each code, and codes that
fall out of use are restarted on random latents of the current batch. That state update is a
separate method (`VectorQuantizer.update_codebook`) which the train step calls after the gradient
step, so the forward pass stays a pure function of the weights.

Data parallelism needs nothing special here: the train step is jitted over global (sharded)
arrays, so the per-code sums below are global sums and XLA inserts the all-reduce.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Codebook(nnx.Variable):
    """Code vectors used at inference (exported with the weights; not a gradient target)."""


class CodebookEMA(nnx.Variable):
    """Training-only EMA statistics of the codebook (not exported)."""


class QuantizerOutput(NamedTuple):
    z_q: jax.Array  # quantized latents with straight-through gradient, [..., D]
    ids: jax.Array  # int32 token ids, [...]
    loss: jax.Array  # scalar auxiliary loss (commitment for VQ, 0 for FSQ)
    z: jax.Array  # the latents that were quantized (normalised for cosine VQ), [..., D]


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value `q`, gradient of the identity w.r.t. `x`."""
    return x + jax.lax.stop_gradient(q - x)


# ---------------------------------------------------------------------------------------------
# VQ: cosine codebook, EMA updates, dead-code restart, commitment loss
# ---------------------------------------------------------------------------------------------
class VectorQuantizer(nnx.Module):
    """L2-normalised (cosine-similarity) vector quantizer with an EMA codebook.

    Latents and codes live on the unit sphere: nearest code = largest dot product, which keeps
    code usage balanced far better than raw L2 codebooks (ViT-VQGAN's finding).
    """

    def __init__(self, codebook_size: int, code_dim: int, *, beta: float = 0.25,
                 decay: float = 0.99, restart_threshold: float = 0.05, rngs: nnx.Rngs):
        self.codebook_size = int(codebook_size)
        self.code_dim = int(code_dim)
        self.input_dim = int(code_dim)
        self.beta = float(beta)
        self.decay = float(decay)
        # A code is dead when its EMA usage falls below this fraction of the uniform usage rate.
        self.restart_threshold = float(restart_threshold)
        init = l2_normalize(jax.random.normal(rngs.params(), (self.codebook_size, self.code_dim)))
        self.codebook = Codebook(init)
        # EMA count starts at 0: every code is "dead" at the first update, so the first batch
        # restarts the whole codebook onto real latents (a data-dependent initialisation).
        self.ema_count = CodebookEMA(jnp.zeros((self.codebook_size,), jnp.float32))
        self.ema_sum = CodebookEMA(jnp.array(init, copy=True))  # distinct buffer (donation)

    def __call__(self, z: jax.Array) -> QuantizerOutput:
        z = l2_normalize(z.astype(jnp.float32))
        ids = self.nearest(z)
        q = self.lookup(ids)
        commit = self.beta * jnp.mean(jnp.sum((z - jax.lax.stop_gradient(q)) ** 2, axis=-1))
        return QuantizerOutput(straight_through(z, q), ids, commit, z)

    def nearest(self, z_unit: jax.Array) -> jax.Array:
        sims = jnp.einsum("...d,kd->...k", z_unit, self.codebook[...])
        return jnp.argmax(sims, axis=-1).astype(jnp.int32)

    def lookup(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.codebook[...], ids, axis=0)

    def update_codebook(self, z: jax.Array, ids: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        """EMA update from one batch's (normalised) latents and ids, then dead-code restart.

        Returns statistics (number of codes restarted, batch perplexity) for logging.
        """
        z = jax.lax.stop_gradient(z.reshape(-1, self.code_dim))
        ids = ids.reshape(-1)
        onehot = jax.nn.one_hot(ids, self.codebook_size, dtype=jnp.float32)
        counts = onehot.sum(0)
        sums = onehot.T @ z
        d = self.decay
        ema_count = d * self.ema_count[...] + (1 - d) * counts
        ema_sum = d * self.ema_sum[...] + (1 - d) * sums

        # Dead-code restart: replace codes whose EMA usage is far below uniform with random
        # latents of this batch. Their statistics restart at 1.25x the threshold: a restarted code
        # that nobody picks is dead again after ~log(1.25)/(1-decay) steps (22 at decay 0.99),
        # short enough that short runs still converge to a well-used codebook.
        uniform = z.shape[0] / self.codebook_size
        threshold = self.restart_threshold * uniform
        dead = ema_count < threshold
        picks = jax.random.randint(key, (self.codebook_size,), 0, z.shape[0])
        fresh = z[picks]
        restart_count = 1.25 * threshold
        ema_count = jnp.where(dead, restart_count, ema_count)
        ema_sum = jnp.where(dead[:, None], fresh * restart_count, ema_sum)

        self.ema_count[...] = ema_count
        self.ema_sum[...] = ema_sum
        self.codebook[...] = l2_normalize(ema_sum)
        return {"vq/restarted": dead.sum().astype(jnp.float32), "vq/perplexity": perplexity(counts)}


# ---------------------------------------------------------------------------------------------
# FSQ: finite scalar quantization (Mentzer et al. 2023)
# ---------------------------------------------------------------------------------------------
class FiniteScalarQuantizer(nnx.Module):
    """Each latent channel is squashed to a bounded range and rounded to one of `levels[i]` values.

    The implicit codebook is the grid of all level combinations (size prod(levels)); there is no
    codebook state, no commitment loss and no codebook collapse to fight.
    """

    def __init__(self, levels: Sequence[int], *, eps: float = 1e-3, rngs: nnx.Rngs | None = None):
        del rngs
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be >= 2 each, got {levels}")
        self.levels = tuple(levels)
        self.eps = float(eps)
        self.codebook_size = int(np.prod(levels))
        self.input_dim = len(levels)
        self.code_dim = len(levels)

    def _arrays(self):
        levels = jnp.asarray(self.levels, jnp.float32)
        basis = jnp.asarray(np.cumprod([1] + list(self.levels[:-1])), jnp.int32)
        return levels, basis

    def bound(self, z: jax.Array) -> jax.Array:
        """Squash channel i into (-L/2, L/2) (odd L) or (-L/2 - 1/2, L/2 - 1/2) (even L), so
        rounding gives exactly L integers, each with a full-width bin, and z = 0 maps to 0.

        (Half-width L/2 rather than the paper's (L-1)/2: the outer bins are full width, and
        L = 2 works - with (L-1)/2 the even-L shift is arctanh(1), i.e. NaN.)"""
        levels, _ = self._arrays()
        half_l = levels * (1 - self.eps) / 2
        offset = jnp.where(jnp.mod(levels, 2) == 0, 0.5, 0.0)
        shift = jnp.arctanh(offset / half_l)
        return jnp.tanh(z + shift) * half_l - offset

    def __call__(self, z: jax.Array) -> QuantizerOutput:
        z = z.astype(jnp.float32)
        bounded = self.bound(z)
        q = straight_through(bounded, jnp.round(bounded))
        ids = self.codes_to_ids(jax.lax.stop_gradient(q))
        z_q = q / self._half_width()
        return QuantizerOutput(z_q, ids, jnp.zeros((), jnp.float32), bounded / self._half_width())

    def _half_width(self) -> jax.Array:
        return jnp.asarray([v // 2 for v in self.levels], jnp.float32)

    def codes_to_ids(self, q_int: jax.Array) -> jax.Array:
        _, basis = self._arrays()
        digits = (jnp.round(q_int) + self._half_width()).astype(jnp.int32)
        return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)

    def lookup(self, ids: jax.Array) -> jax.Array:
        levels, basis = self._arrays()
        digits = (ids[..., None] // basis) % levels.astype(jnp.int32)
        return (digits.astype(jnp.float32) - self._half_width()) / self._half_width()

    def grid(self) -> jax.Array:
        """All codes in id order, [prod(levels), len(levels)] (normalised values)."""
        return self.lookup(jnp.arange(self.codebook_size, dtype=jnp.int32))


# ---------------------------------------------------------------------------------------------
def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of a code histogram: the effective number of codes used."""
    p = counts / jnp.maximum(counts.sum(), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def make_quantizer(cfg, *, rngs: nnx.Rngs):
    """Build the quantizer named by `cfg.kind` ("vq" or "fsq") from a tokenizer config section."""
    kind = cfg.kind
    if kind == "vq":
        return VectorQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta, decay=cfg.ema_decay,
                               restart_threshold=cfg.restart_threshold, rngs=rngs)
    if kind == "fsq":
        q = FiniteScalarQuantizer(cfg.levels, rngs=rngs)
        if cfg.get("codebook_size") and int(cfg.codebook_size) != q.codebook_size:
            raise ValueError(f"quantizer.codebook_size={cfg.codebook_size} contradicts FSQ levels "
                             f"{list(cfg.levels)} (prod = {q.codebook_size})")
        return q
    raise ValueError(f"quantizer.kind must be 'vq' or 'fsq', got {kind!r}")


def codebook_size_of(cfg) -> int:
    return int(math.prod(cfg.levels)) if cfg.kind == "fsq" else int(cfg.codebook_size)
