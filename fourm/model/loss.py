"""The training objective: cross-entropy per target modality, averaged over modalities.

`loss_type="mod"` is 4M's `forward_mod_loss`: each target modality's mean cross-entropy over all of
its predictions in the batch, then the plain mean over the model's target modalities; a modality
with no prediction in the batch contributes 0 and still counts in the mean (as 4M does).
`loss_type="token"` is the mean over all predictions (4M's `forward_token_loss` intends this; its
code weights modalities by count x vocabulary size, which we do not copy).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def loss_fn(model, batch: Mapping[str, jax.Array], loss_type: str | None = None):
    """(loss, metrics) for a masked batch; metrics has loss/<mod>, acc/<mod>, tokens/<mod>.

    Pure and jittable: `jax.value_and_grad(lambda m: loss_fn(m, batch), has_aux=True)` or the
    trainer's split/merge step both work. `loss_type` overrides config.model.loss_type.
    """
    spec = model.spec
    loss_type = loss_type or spec.loss_type
    enc = model.encode(batch)
    y = model.decode(enc, batch)
    head_ids = model.target_head_ids(batch)
    weighted, nll, correct = model.target_loss(y, batch, head_ids, token_weights(spec, head_ids, loss_type))
    value, metrics = reduce_loss(spec, jax.lax.stop_gradient(nll), correct, head_ids, loss_type)
    # The value is reduce_loss's (bit-identical metrics); the gradient is the weighted sum's, which
    # the head computes in its forward pass. Both are the same linear function of nll.
    loss = value + (weighted - jax.lax.stop_gradient(weighted))
    metrics["loss"] = loss
    return loss, metrics


def token_weights(spec, head_ids: jax.Array, loss_type: str) -> jax.Array:
    """w (B, N) with reduce_loss(nll) == sum(w * nll): the loss as a weighted sum of slot nlls."""
    m = len(spec.targets)
    if loss_type == "mod":
        counts = jnp.sum(head_ids[..., None] == jnp.arange(m), axis=tuple(range(head_ids.ndim)))
        per_head = 1.0 / (m * jnp.maximum(counts.astype(jnp.float32), 1.0))
        return jnp.where(head_ids < m, per_head[jnp.clip(head_ids, 0, m - 1)], 0.0)
    if loss_type == "token":
        count = jnp.sum(head_ids < m).astype(jnp.float32)
        return jnp.where(head_ids < m, 1.0 / jnp.maximum(count, 1.0), 0.0)
    raise ValueError(f"loss_type={loss_type!r}; known: mod, token")


def reduce_loss(spec, nll, correct, head_ids, loss_type: str):
    targets = spec.targets
    metrics = {}
    per_mod = []
    total_count = jnp.zeros((), jnp.float32)
    total_sum = jnp.zeros((), jnp.float32)
    for h, i in enumerate(targets):
        name = spec.modalities[i].name
        sel = head_ids == h
        count = jnp.sum(sel).astype(jnp.float32)
        s = jnp.sum(jnp.where(sel, nll, 0.0))
        mean = s / jnp.maximum(count, 1.0)
        per_mod.append(mean)
        total_count, total_sum = total_count + count, total_sum + s
        metrics[f"loss/{name}"] = mean
        metrics[f"acc/{name}"] = jnp.sum(sel & correct) / jnp.maximum(count, 1.0)
        metrics[f"tokens/{name}"] = count
    if loss_type == "mod":
        loss = jnp.mean(jnp.stack(per_mod)) if per_mod else jnp.zeros((), jnp.float32)
    elif loss_type == "token":
        loss = total_sum / jnp.maximum(total_count, 1.0)
    else:
        raise ValueError(f"loss_type={loss_type!r}; known: mod, token")
    metrics["loss"] = loss
    return loss, metrics
