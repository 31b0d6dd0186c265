"""Logical axis names -> mesh axes: the one rules table, plus helpers for params and activations.

Every parameter carries logical names in its `out_sharding` metadata (e.g. a MLP kernel is
("embed", "mlp")); key activations are constrained with `constrain(x, ("batch", "seq", "embed"))`.
`RULES` maps each logical name to mesh axes of the ("data", "fsdp", "tensor") mesh:

* params: "embed" -> fsdp (ZeRO-3 style: every big matrix is split over fsdp along its model
  dim), "mlp" / "heads" / "vocab" -> tensor (Megatron-style tensor parallelism);
* activations: "batch" -> (data, fsdp), heads / mlp / vocab -> tensor, "embed" unsharded.

A dimension whose size the mesh axes do not divide stays replicated (recorded, never an error),
so any model runs on any mesh; `replicated_fraction` measures what that costs and the tests fail
when more than 2% of parameter bytes stay replicated under FSDP.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# The mesh axis names, here and nowhere else (`fourm.train.mesh.make_mesh` builds the mesh).
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the data-parallel axes a batch is split over

RULES: dict[str, tuple[str, ...] | str | None] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "qkv": None,  # the 3 of a fused q/k/v kernel (2 for k/v)
    "vocab": "tensor",
    "patch": None,  # flattened pixel patch (P*P*C) of a patch projection
    "layers": None,  # stacked blocks (scan axis)
    "norm": None,  # LayerNorm scales / biases: tiny, replicated
    "registers": None,
    "pos": None,  # learned position tables
    # activations
    "batch": BATCH_AXES,
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def _mesh_axes_for(name: str | None, rules: dict | None = None) -> tuple[str, ...]:
    rules = RULES if rules is None else rules
    if name is None:
        return ()
    if name not in rules:
        raise KeyError(f"logical axis {name!r} has no rule in fourm.model.sharding.RULES; "
                       f"known: {sorted(rules)}")
    rule = rules[name]
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None, rules: dict | None = None) -> P:
    """PartitionSpec for logical `names`; with `shape` + `mesh_shape`, drop axes that don't divide."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used)
        if shape is not None and mesh_shape is not None:
            axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
            if axes and shape[i] % math.prod(mesh_shape[a] for a in axes):
                axes = ()  # does not divide: keep this dimension replicated
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def current_mesh():
    """The mesh set with `jax.set_mesh` / `jax.sharding.use_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set (single device)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def _names_of(var) -> tuple:
    names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return tuple(names) if names else ()


def param_specs(state: nnx.State, mesh: Mesh, rules: dict | None = None) -> Any:
    """PartitionSpec tree (same structure as `state`) from each Variable's logical names."""
    mesh_shape = dict(mesh.shape)

    def spec(var):
        names = _names_of(var)
        shape = var.get_value().shape if isinstance(var, nnx.Variable) else var.shape
        if not names:
            return P()
        if len(names) != len(shape):
            raise ValueError(f"logical names {names} do not match the shape {shape}")
        return logical_to_spec(names, shape, mesh_shape, rules)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """`state` with each Variable's value replaced by its NamedSharding: the same pytree structure
    as `state`, so it serves directly as jit in/out shardings or with jax.device_put."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda v, s: v.replace(NamedSharding(mesh, s)), state, param_specs(state, mesh),
                        is_leaf=is_var)


def replicated_fraction(state: nnx.State, mesh: Mesh, rules: dict | None = None) -> tuple[float, list[str]]:
    """(fraction of parameter bytes fully replicated on `mesh`, names of the replicated params)."""
    specs = param_specs(state, mesh, rules)
    flat_vars = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    total = replicated = 0
    names = []
    for (path, var), spec in zip(flat_vars, flat_specs):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        total += nbytes
        if all(s is None for s in spec):
            replicated += nbytes
            names.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return (replicated / total if total else 0.0), names


def check_fsdp(state: nnx.State, mesh: Mesh, max_fraction: float = 0.02, rules: dict | None = None) -> float:
    """Raise if more than `max_fraction` of parameter bytes stay replicated on `mesh` (names them)."""
    frac, names = replicated_fraction(state, mesh, rules)
    if frac > max_fraction:
        raise ValueError(f"{frac:.1%} of parameter bytes are replicated on mesh {dict(mesh.shape)} "
                         f"(limit {max_fraction:.0%}): {names[:20]}{' ...' if len(names) > 20 else ''}")
    return frac
