"""Device mesh from the config: axes (data, fsdp, tensor), ICI sizes inside a slice, DCN across.

`config.mesh` holds ICI sizes `data`, `fsdp`, `tensor` and DCN sizes `dcn_data`, `dcn_fsdp`,
`dcn_tensor` (missing DCN fields mean 1). One size per group may be -1: it is inferred from the
device count. The mesh axis size is ICI x DCN, so `data` spans both networks (the usual choice:
only data parallelism, whose all-reduce is once per step, crosses the slow DCN links).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from fourm.model.sharding import MESH_AXES as AXES


class MeshConfigError(ValueError):
    """The mesh in the config cannot be built on these devices."""


def _infer(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    sizes = [int(s) for s in sizes]
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshConfigError(f"{what} sizes must be positive or -1 (infer), got {dict(zip(AXES, sizes))}")
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise MeshConfigError(f"at most one {what} size may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if total % known:
            raise MeshConfigError(
                f"{what} sizes {dict(zip(AXES, sizes))}: the fixed sizes multiply to {known}, which does "
                f"not divide the {total} devices available; cannot infer the -1 axis")
        sizes[unknown[0]] = total // known
    if math.prod(sizes) != total:
        raise MeshConfigError(
            f"{what} sizes {dict(zip(AXES, sizes))} multiply to {math.prod(sizes)}, but there are "
            f"{total} devices; set the sizes so their product is {total} (or use -1 for one axis)")
    return tuple(sizes)


def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int, num_slices: int = 1
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici_shape, dcn_shape) over AXES, with -1 resolved; raises MeshConfigError if impossible."""
    dcn = [int(mesh_cfg.get(f"dcn_{a}", 1)) for a in AXES]
    dcn_shape = _infer(dcn, num_slices, "DCN mesh (config.mesh.dcn_*)")
    if num_devices % num_slices:
        raise MeshConfigError(f"{num_devices} devices do not split into {num_slices} slices")
    ici = [int(mesh_cfg.get(a, 1)) for a in AXES]
    ici_shape = _infer(ici, num_devices // num_slices, "ICI mesh (config.mesh.data/fsdp/tensor)")
    return ici_shape, dcn_shape


def _num_slices(devices: Sequence[Any], mesh_cfg: Mapping[str, Any]) -> tuple[int, bool]:
    """Number of DCN granules and whether they are processes (no slice_index, e.g. CPU/GPU)."""
    if hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices}), False
    wants_dcn = any(int(mesh_cfg.get(f"dcn_{a}", 1)) != 1 for a in AXES)
    # Without slices, each process (host) is a granule - but only when the config asks for DCN
    # axes; otherwise a single-slice mesh spans all processes (a GPU cluster with fast links).
    return (len({d.process_index for d in devices}) if wants_dcn else 1), True


def make_mesh(mesh_cfg: Mapping[str, Any] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh for `devices` (default: all global devices).

    `mesh_cfg` is `config.mesh` or just the ICI sizes (data, fsdp, tensor)."""
    if not hasattr(mesh_cfg, "get"):
        mesh_cfg = dict(zip(AXES, mesh_cfg))
    devices = list(jax.devices() if devices is None else devices)
    num_slices, process_is_granule = _num_slices(devices, mesh_cfg)
    ici_shape, dcn_shape = mesh_shape(mesh_cfg, len(devices), num_slices)
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=process_is_granule)
    else:
        grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    # Auto axes: shardings come from explicit in/out shardings plus logical-axis constraints
    # inside the model, not from sharding-in-types (jax.make_mesh's Explicit default).
    return Mesh(np.asarray(grid), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
