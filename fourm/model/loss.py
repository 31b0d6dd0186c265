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
    enc = model.encode(batch)
    y = model.decode(enc, batch)
    nll, correct, head_ids = model.target_nll(y, batch)
    return reduce_loss(model.spec, nll, correct, head_ids, loss_type or model.spec.loss_type)


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
