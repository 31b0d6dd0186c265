"""The functional core of training: train state, the update step and the eval step.

The NNX model is split once, outside jit, into a static graphdef and array state; the jitted step
merges them, computes the loss and splits again (flax examples/gemma style), so graph traversal
never runs in the hot loop and the state is a plain pytree that jit can donate and orbax can save.

    state = {"params": nnx.State (nnx.Param), "rest": nnx.State (other variables, e.g. rng
             counters), "opt": optax state, "step": int32}

The step is pure: the same state and batch give the same bits, which is what exact resume rests on.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


def split_model(model: nnx.Module):
    """(graphdef, params, rest)."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """(graphdef, state) for a freshly initialised model."""
    graphdef, params, rest = split_model(model)
    return graphdef, {"params": params, "rest": rest, "opt": tx.init(params),
                      "step": jnp.zeros((), jnp.int32)}


def _path_strings(path) -> list[str]:
    return [jax.tree_util.keystr((k,), simple=True) for k in path]


def modality_groups(params: Any, modality_names: Sequence[str]) -> dict[str, list[int]]:
    """Leaf indices of `params` per modality (a path component names it); the rest is 'shared'.

    Used to name the modality whose gradients went non-finite."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    groups: dict[str, list[int]] = {m: [] for m in modality_names}
    groups["shared"] = []
    for i, (path, _) in enumerate(flat):
        parts = _path_strings(path)
        owner = next((m for m in modality_names if m in parts), "shared")
        groups[owner].append(i)
    return {k: v for k, v in groups.items() if v}


def _microbatches(batch: dict, accum: int) -> dict:
    return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1,
                    groups: dict[str, list[int]] | None = None):
    """step(state, batch) -> (state, metrics). Wrap with jax.jit (shardings, donation) outside.

    A non-finite loss or gradient never reaches the parameters: the update is replaced by the old
    state, `metrics["finite"]` is 0 and `metrics["nonfinite/<group>"]` flags the culprits. The
    host (the trainer) decides whether to stop or carry on with the next batch.
    """

    def loss_and_metrics(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = loss_fn(model, batch)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (metrics, new_rest)

    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def step(state, batch):
        params, rest = state["params"], state["rest"]
        if grad_accum == 1:
            (loss, (metrics, rest)), grads = grad_fn(params, rest, batch)
        else:
            # Sum gradients over micro-batches in a scan: activations of one micro-batch at a time.
            def body(carry, micro):
                g_acc, l_acc, m_acc, r = carry
                (l, (m, r)), g = grad_fn(params, r, micro)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
                        jax.tree.map(jnp.add, m_acc, m), r), None
            zeros_g = jax.tree.map(jnp.zeros_like, params)
            m_shape = jax.eval_shape(lambda: grad_fn(params, rest, jax.tree.map(
                lambda x: x[0], _microbatches(batch, grad_accum)))[0][1][0])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, loss, metrics, rest), _ = jax.lax.scan(
                body, (zeros_g, jnp.zeros((), jnp.float32), zeros_m, rest),
                _microbatches(batch, grad_accum))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss = loss / grad_accum
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)

        leaves_ok = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(leaves_ok))
        updates, new_opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {"params": keep(new_params, params), "rest": keep(rest, state["rest"]),
                     "opt": keep(new_opt, state["opt"]), "step": state["step"] + 1}
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), lr=schedule(state["step"]),
                   finite=finite.astype(jnp.float32))
        for name, idx in (groups or {}).items():
            out[f"nonfinite/{name}"] = 1.0 - jnp.all(jnp.stack([leaves_ok[i] for i in idx])).astype(jnp.float32)
        return new_state, out

    return step


def make_eval_step(graphdef, loss_fn: LossFn):
    def eval_step(state, batch):
        model = nnx.merge(graphdef, state["params"], state["rest"])
        loss, metrics = loss_fn(model, batch)
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out["loss"] = loss
        return out
    return eval_step
