"""AdamW as 4M trains it: betas (0.9, 0.95), weight decay 0.05 except norms, biases and embeddings
that act as biases, linear warmup then cosine decay, gradient clipping by global norm.

Config (`config.optim`): lr, min_lr, warmup_steps, b1, b2, eps, weight_decay, clip_grad (<= 0 = off).
The schedule length is `config.num_train_steps`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

# Parameters that are not matrices of a linear map: 4M's `no_weight_decay()` names (positional and
# modality embeddings, the mask token) plus every 1-D parameter (norm scales/biases, linear biases).
NO_DECAY_NAMES = ("bias", "scale", "pos_emb", "mod_emb", "mask_token")


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        out.append(str(name))
    return out


def decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where weight decay applies."""
    def decays(path, leaf) -> bool:
        names = _path_names(path)
        if getattr(leaf, "ndim", 0) <= 1:
            return False
        return not any(n in NO_DECAY_NAMES for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(optim_cfg, total_steps: int, peak: float | None = None) -> optax.Schedule:
    warmup = int(min(optim_cfg.warmup_steps, max(total_steps - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim_cfg.lr if peak is None else peak), warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1), end_value=float(optim_cfg.min_lr))


def _adamw(optim_cfg, schedule) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate=schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
        eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay), mask=decay_mask)


def make_optimizer(optim_cfg, total_steps: int, *, labels: Callable[[Any], Any] | None = None,
                   new_lr: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule). The decay mask is computed from the params passed to `init`.

    `labels` (fine-tuning): params -> tree of "pretrained" | "new" | "frozen". Frozen parameters
    get zero updates (and no weight decay, no optimizer state, no share of the clipping norm);
    new ones follow the same schedule shape peaking at `new_lr` (0 = optim_cfg.lr)."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    clip = ([optax.clip_by_global_norm(float(optim_cfg.clip_grad))]
            if float(optim_cfg.clip_grad) > 0 else [])
    if labels is None:
        return optax.chain(*clip, _adamw(optim_cfg, schedule)), schedule
    new_schedule = schedule
    if new_lr > 0:
        new_schedule = learning_rate_schedule(optim_cfg, total_steps, peak=new_lr)
    tx = optax.chain(
        # Frozen gradients are zeroed before clipping, so they do not shrink the others.
        optax.multi_transform({"frozen": optax.set_to_zero(), "pretrained": optax.identity(),
                               "new": optax.identity()}, labels),
        *clip,
        optax.multi_transform({"frozen": optax.set_to_zero(),
                               "pretrained": _adamw(optim_cfg, schedule),
                               "new": _adamw(optim_cfg, new_schedule)}, labels))
    return tx, schedule
