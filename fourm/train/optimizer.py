"""AdamW as 4M trains it: betas (0.9, 0.95), weight decay 0.05 except norms, biases and embeddings
that act as biases, linear warmup then cosine decay, gradient clipping by global norm.

Config (`config.optim`): lr, min_lr, warmup_steps, b1, b2, eps, weight_decay, clip_grad (<= 0 = off).
The schedule length is `config.num_train_steps`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

# Parameters that are not matrices of a linear map: 4M's `no_weight_decay()` names (positional and
# modality embeddings, the mask token) plus every 1-D parameter (norm scales/biases, linear biases).
NO_DECAY_NAMES = ("bias", "scale", "pos_emb", "mod_emb", "mask_token")


def _path_names(path) -> list[str]:
    return [jax.tree_util.keystr((k,), simple=True) for k in path]


def decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where weight decay applies."""
    def decays(path, leaf) -> bool:
        names = _path_names(path)
        if getattr(leaf, "ndim", 0) <= 1:
            return False
        return not any(n in NO_DECAY_NAMES for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = int(min(optim_cfg.warmup_steps, max(total_steps - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim_cfg.lr), warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1), end_value=float(optim_cfg.min_lr))


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule). The decay mask is computed from the params passed to `init`."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if float(optim_cfg.clip_grad) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_grad)))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
        eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule
