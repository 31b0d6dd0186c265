"""Output heads + cross-entropy with logits only over each target token's own vocabulary.

Why this exists: a 4M decoder slot belongs to one target modality, and only that modality's
head (V_m x D) applies to it. Computing every head for every slot costs sum_m V_m per token
(tiny 4M: 54k instead of ~18k logits per token on average; the head is then the biggest matmul of
the model). Per-sample Dirichlet budgets make the per-modality counts data-dependent, so:

1. slots are bucketed by modality into a static buffer of C = T + M*k rows, each modality's run
   padded to a multiple of the tail chunk size k = K/4 (`_layout`, no sort: a (T, M) cumsum
   gives ranks);
2. for each head m, `fori_loop`s with *dynamic* trip counts run K x D x V_m matmuls over that
   modality's full chunks of K rows, then k-row matmuls over the rest (`_plan`), producing
   logsumexp, target logit and argmax; padding costs at most k-1 rows per modality (whole
   K-row chunks cost 20% extra head work at the benchmark's shapes);
3. training calls `own_vocab_loss` with the loss as a weighted sum of slot nlls (weights known
   up front), so the loops also compute that loss's gradients (softmax - onehot, dh, dW) while
   each chunk's logits are at hand: 3 head matmuls per chunk for forward+backward, and no logits
   are ever stored (memory O(C) instead of O(T x V)). Any other cotangent of the per-slot nll
   (`own_vocab_nll` under autodiff) re-runs the loops and recomputes the logits (4 matmuls).

Alternatives measured on CPU (tiny shapes, 1024 tokens, V = 16384/8192/30000): all heads for
all tokens 0.32 s fwd; `lax.ragged_dot` over vocab-padded stacked heads 0.48 s (dense fallback
on CPU, and padding every head to the largest vocabulary); differentiating a scan+switch 1.2 s
fwd+bwd (carry copies of every dW per step); this scheme 0.10 s fwd. With the loss gradients in
the forward loop (and argmax without XLA:CPU's slow variadic reduce), forward+backward of the
head went from 1.29 to 0.71 CPU-s. `head_impl="dense"` keeps the straightforward version as a
reference.

Under a mesh with batch axes, the chunked path runs inside `shard_map` over those axes, so each
device buckets only its own slots (a global bucketing would gather all decoder outputs on every
device); head weights enter replicated and their gradients are summed over the batch axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from fourm.model.sharding import BATCH_AXES, current_mesh


def _layout(head_ids: jax.Array, num_heads: int, align: int, chunk: int):
    """Buffer row of every token (C = out of range for tokens without head), run starts, counts.

    Each head's run starts at a multiple of `align` (the tail chunk size), so a run of n tokens
    wastes at most align - 1 rows. The buffer holds at least one full chunk even when there are
    fewer tokens (few samples per device, one target modality): the full-chunk loop then runs
    zero times, but its slice of `chunk` rows must still fit the buffer to be traced."""
    t = head_ids.shape[0]
    cap = max(t + num_heads * align, chunk)
    onehot = (head_ids[:, None] == jnp.arange(num_heads, dtype=head_ids.dtype)[None, :]).astype(jnp.int32)
    counts = onehot.sum(0)
    rank = jnp.cumsum(onehot, axis=0) - 1
    valid = head_ids < num_heads
    hid = jnp.clip(head_ids, 0, num_heads - 1)
    rank_t = jnp.take_along_axis(rank, hid[:, None], axis=1)[:, 0]
    padded = (counts + align - 1) // align * align
    starts = jnp.cumsum(padded) - padded
    dest = jnp.where(valid, starts[hid] + rank_t, cap)
    return dest, valid, starts, counts, cap


def _tail(chunk: int) -> int:
    return chunk // 4 if chunk % 4 == 0 and chunk >= 32 else chunk


def _plan(starts, counts, m: int, chunk: int):
    """[(rows, trips, start_of(i))]: full chunks of head m's run, then its rest in tail chunks.

    Rows past a run's end (< tail) are zero padding: their loss weight is 0. The small tail
    chunks matter: padding whole chunks cost 20% extra head work at the benchmark's shapes."""
    tail = _tail(chunk)
    if tail == chunk:
        return [(chunk, (counts[m] + chunk - 1) // chunk, lambda i: starts[m] + i * chunk)]
    full = counts[m] // chunk
    rest = counts[m] - full * chunk
    plan = [(chunk, full, lambda i: starts[m] + i * chunk),
            (tail, (rest + tail - 1) // tail, lambda i: starts[m] + full * chunk + i * tail)]
    return plan


def _chunk_logits(hc, w):
    return jnp.dot(hc, w.T, preferred_element_type=jnp.float32)


def _chunk_stats(hc, tc, w):
    """Logits of one chunk and their row statistics: (lg, e = exp(lg - max), sum e, lse, target
    logit, argmax). The argmax is the first index that attains the row maximum (jnp.argmax's
    rule) found with a plain min-reduction: XLA:CPU runs jnp.argmax as a variadic (value, index)
    reduce that cost half as much as the chunk's matmul (measured, 30000-way caption head)."""
    lg = _chunk_logits(hc, w)
    mx = jnp.max(lg, axis=-1)
    shift = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(lg - shift[:, None])
    se = jnp.sum(e, axis=-1)
    lse = jnp.log(se) + shift  # = jax.nn.logsumexp(lg, -1), same operations
    tl = jnp.take_along_axis(lg, tc[:, None], axis=-1)[:, 0]
    iota = jax.lax.broadcasted_iota(jnp.int32, lg.shape, 1)
    am = jnp.min(jnp.where(lg == mx[:, None], iota, lg.shape[1]), axis=-1)
    return lg, e, se, lse, tl, am


def _forward(h, head_ids, targets, weights, token_weights, chunk, grads: bool, grad_w: bool):
    """Bucketed pass over every head. With `grads`, also the gradients of sum_t token_weights_t *
    nll_t: dh (T, D) and dW per head (grad_w), from the same chunk logits (no recomputation)."""
    m_heads = len(weights)
    dest, valid, starts, counts, cap = _layout(head_ids, m_heads, _tail(chunk), chunk)
    dim = h.shape[1]
    hb = jnp.zeros((cap, dim), h.dtype).at[dest].set(h, mode="drop")
    tb = jnp.zeros((cap,), jnp.int32).at[dest].set(targets.astype(jnp.int32), mode="drop")
    stats = (jnp.zeros((cap,), jnp.float32), jnp.zeros((cap,), jnp.float32), jnp.zeros((cap,), jnp.int32))
    gb = dhb = None
    if grads:
        gb = jnp.zeros((cap,), jnp.float32).at[dest].set(
            jnp.where(valid, token_weights.astype(jnp.float32), 0.0), mode="drop")
        dhb = jnp.zeros((cap, dim), jnp.float32)
    dws = []
    for m, w in enumerate(weights):
        vocab = w.shape[0]
        dw = jnp.zeros(w.shape, jnp.float32) if grads and grad_w else None
        for rows, trips, at in _plan(starts, counts, m, chunk):

            def body(i, c, w=w, vocab=vocab, at=at, rows=rows):
                (lse_b, tl_b, am_b), dhb, dw = c
                s = at(i)
                hc = jax.lax.dynamic_slice_in_dim(hb, s, rows)
                tc = jnp.clip(jax.lax.dynamic_slice_in_dim(tb, s, rows), 0, vocab - 1)
                lg, e, se, lse, tl, am = _chunk_stats(hc, tc, w)
                out = (jax.lax.dynamic_update_slice_in_dim(lse_b, lse, s, 0),
                       jax.lax.dynamic_update_slice_in_dim(tl_b, tl, s, 0),
                       jax.lax.dynamic_update_slice_in_dim(am_b, am, s, 0))
                if not grads:
                    return out, dhb, dw
                gc = jax.lax.dynamic_slice_in_dim(gb, s, rows)
                dl = _dlogits(e, se, tc, gc, w.dtype)
                dhb = jax.lax.dynamic_update_slice_in_dim(
                    dhb, jnp.dot(dl, w, preferred_element_type=jnp.float32), s, 0)
                if grad_w:
                    dw = dw + jnp.dot(dl.T, hc, preferred_element_type=jnp.float32)
                return out, dhb, dw

            stats, dhb, dw = jax.lax.fori_loop(0, trips, body, (stats, dhb, dw))
        dws.append(dw)
    lse_b, tl_b, am_b = stats
    d = jnp.minimum(dest, cap - 1)
    nll = jnp.where(valid, lse_b[d] - tl_b[d], 0.0)
    correct = valid & (am_b[d] == targets)
    dh = jnp.where(valid[:, None], dhb[d], 0.0) if grads else None
    return (nll, correct), (dh, dws)


def _dlogits(e, se, tc, gc, dtype):
    """d (sum_rows g * nll) / d logits = g * (softmax - onehot(target)), one fused pass."""
    iota = jax.lax.broadcasted_iota(jnp.int32, e.shape, 1)
    dl = e * (gc / se)[:, None] - jnp.where(iota == tc[:, None], gc[:, None], 0.0)
    return dl.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked(h, head_ids, targets, weights, token_weights, chunk, fused):
    """(loss = sum_t token_weights_t * nll_t, nll, correct)."""
    (nll, correct), _ = _forward(h, head_ids, targets, weights, None, chunk, False, False)
    return jnp.sum(token_weights * nll), nll, correct


def _chunked_fwd(h, head_ids, targets, weights, token_weights, chunk, fused):
    # symbolic_zeros: every leaf arrives as CustomVJPPrimal(value, perturbed).
    val = lambda x: x.value  # noqa: E731
    grad_w = any(p.perturbed for p in weights)
    h, head_ids, targets, token_weights = map(val, (h, head_ids, targets, token_weights))
    weights = tuple(map(val, weights))
    (nll, correct), (dh, dws) = _forward(h, head_ids, targets, weights, token_weights, chunk,
                                         fused, fused and grad_w)
    loss = jnp.sum(token_weights * nll)
    return (loss, nll, correct), ((h, head_ids, targets), weights, nll, token_weights, dh, tuple(dws))


def _chunked_bwd(chunk, fused, res, cts):
    (h, head_ids, targets), weights, nll, token_weights, dh, dws = res
    ct_loss, ct_nll, _ = cts
    zero = lambda c: isinstance(c, SymbolicZero)  # noqa: E731
    add = lambda a, b: b if a is None else a + b  # noqa: E731
    g_h, g_w, g_nll = None, [None] * len(weights), None
    if not zero(ct_loss):
        if fused:
            # The training case: the forward loops computed the gradients for a unit loss
            # cotangent; scale them.
            g_h = ct_loss * dh
            g_w = [None if dw is None else ct_loss * dw for dw in dws]
        else:
            g_nll = ct_loss * token_weights
    if not zero(ct_nll):
        g_nll = add(g_nll, ct_nll)
    if g_nll is not None:
        # Any other per-slot cotangent: the same loops once more, weighting slot t by g_nll_t
        # (the chunk logits are recomputed; nothing of size T x V was kept).
        _, (dh2, dws2) = _forward(h, head_ids, targets, weights, g_nll, chunk, True, True)
        g_h = add(g_h, dh2)
        g_w = [add(a, b) for a, b in zip(g_w, dws2)]
    g_h = jnp.zeros(h.shape, h.dtype) if g_h is None else g_h.astype(h.dtype)
    g_w = tuple(jnp.zeros_like(w) if g is None else g.astype(w.dtype) for g, w in zip(g_w, weights))
    g_tw = None if zero(ct_loss) else ct_loss * nll
    return g_h, None, None, g_w, g_tw


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


def dense_nll(h, head_ids, targets, weights):
    """Reference: every head on every token, then pick each token's own (costs sum_m V_m)."""
    nll = jnp.zeros(h.shape[:-1], jnp.float32)
    correct = jnp.zeros(h.shape[:-1], bool)
    for m, w in enumerate(weights):
        lg = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
        t = jnp.clip(targets, 0, w.shape[0] - 1)
        tl = jnp.take_along_axis(lg, t[..., None], axis=-1)[..., 0]
        sel = head_ids == m
        nll = jnp.where(sel, jax.nn.logsumexp(lg, axis=-1) - tl, nll)
        correct = jnp.where(sel, jnp.argmax(lg, axis=-1) == targets, correct)
    return nll, correct


def own_vocab_nll(h: jax.Array, head_ids: jax.Array, targets: jax.Array, weights: tuple,
                  *, impl: str = "chunked", chunk: int = 128):
    """Per-slot negative log-likelihood and argmax-correctness under each slot's own head.

    h (B, N, D); head_ids (B, N) int in [0, M] (M = slot without head: padding); targets (B, N);
    weights: M head matrices (V_m, D) in compute dtype. Returns (nll (B, N) f32, correct (B, N)).
    Differentiable for any cotangent of nll (the backward pass recomputes the chunk logits); a
    training loss should use `own_vocab_loss`, whose gradients come with the forward pass.
    """
    _, nll, correct = _heads(h, head_ids, targets, weights, None, impl, chunk)
    return nll, correct


def own_vocab_loss(h: jax.Array, head_ids: jax.Array, targets: jax.Array, weights: tuple,
                   token_weights: jax.Array, *, impl: str = "chunked", chunk: int = 128):
    """(loss, nll, correct): `own_vocab_nll` plus loss = sum(token_weights * nll) (a scalar).

    Any loss linear in the per-slot nll (4M's per-modality means, the token mean) is such a
    weighted sum with weights known before the forward pass, so the chunked head computes the
    loss gradients (softmax - onehot, then dh and dW) while each chunk's logits are at hand:
    3 head matmuls per chunk instead of 4, and no second pass. Cotangents reaching `nll` itself
    (rare: metrics are usually stop-gradient) are still handled by recomputation.
    """
    return _heads(h, head_ids, targets, weights, token_weights, impl, chunk)


def _heads(h, head_ids, targets, weights, token_weights, impl, chunk):
    fused = token_weights is not None
    if not fused:
        token_weights = jnp.zeros(h.shape[:-1], jnp.float32)
    if impl == "dense":
        nll, correct = dense_nll(h, head_ids, targets, weights)
        return jnp.sum(token_weights * nll), nll, correct
    if impl != "chunked":
        raise ValueError(f"model.head_impl={impl!r}; known: chunked, dense")

    def local(h, head_ids, targets, weights, token_weights):
        b, n, d = h.shape
        loss, nll, correct = _chunked(
            h.reshape(b * n, d), head_ids.reshape(-1).astype(jnp.int32),
            targets.reshape(-1).astype(jnp.int32), tuple(weights),
            token_weights.reshape(-1).astype(jnp.float32), int(chunk), fused)
        return loss.reshape(1), nll.reshape(b, n), correct.reshape(b, n)

    mesh = current_mesh()
    axes = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.shape and mesh.shape[a] > 1)
    args = (h, head_ids, targets, tuple(weights), token_weights)
    if not axes or h.shape[0] % math.prod(mesh.shape[a] for a in axes):
        loss, nll, correct = local(*args)  # single device, or a batch the mesh can't split
        return loss[0], nll, correct
    spec = P(axes)
    # Per-device partial losses come out as a (devices,) vector summed outside: a psum inside the
    # shard_map would be transposed into a second psum of the cotangent.
    loss, nll, correct = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(), spec),
                                       out_specs=(spec, spec, spec), check_vma=False)(*args)
    return jnp.sum(loss), nll, correct
