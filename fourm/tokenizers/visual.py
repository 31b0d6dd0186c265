"""Reconstruction pictures for the tokenizers: rows of `input | reconstruction` as one PNG.

Colouring comes from `fourm.data.visualize` (depth, normals and segmentation colour maps shared
by the whole project).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_rgb(codec, x: np.ndarray, depth_range: tuple[float, float] | None = None) -> np.ndarray:
    """Native batch of the codec's modality -> uint8 [B, H, W, 3] pictures."""
    from fourm.data import visualize as vis

    x = np.asarray(x)
    if codec.kind == "image":
        return x if x.shape[-1] == 3 else np.repeat(x[..., :1], 3, -1)
    if codec.kind == "depth":
        return np.stack([vis.colorize_depth(d, *(depth_range or (None, None))) for d in x])
    if codec.kind == "normals":
        return np.stack([vis.colorize_normals(n) for n in x])
    if codec.kind == "classes":
        return np.stack([vis.colorize_semseg(s) for s in x])
    raise ValueError(f"no picture for codec kind {codec.kind!r}")


def save_pairs(codec, x: np.ndarray, rec: np.ndarray, path) -> Path:
    """One row per example: input | reconstruction (depth shares the input's colour range)."""
    from fourm.data import visualize as vis

    rng = None
    if codec.kind == "depth":
        x = np.asarray(x)
        finite = x[np.isfinite(x) & (x > 0)]
        rng = (float(finite.min()), float(finite.max())) if finite.size else (codec.min_depth,
                                                                               codec.max_depth)
    a, b = to_rgb(codec, x, rng), to_rgb(codec, rec, rng)
    grid = vis.make_grid([[a[i], b[i]] for i in range(len(a))],
                         col_titles=["input", "reconstruction"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vis.save_png(path, grid)
    return path
