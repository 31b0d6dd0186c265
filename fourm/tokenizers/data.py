"""Training and held-out arrays for the image-like tokenizers.

Two sources: the procedural scene generator (`data.source = "scenes"`; scenes are a pure function
of (seed, index), held-out scenes come from a disjoint index range) and a user's aligned folder
(`data.source = "folder"`, layout of `fourm.data.folder`). Generated scenes are cached as one
`.npy` per field under `data.cache_dir`, so the four tokenizers share one generation pass;
the cache is written atomically and read back with `allow_pickle=False`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fourm.io import atomic_save_npy

IMAGE_FIELDS = ("rgb", "depth", "normals", "semseg")


def split_range(cfg, split: str) -> tuple[int, int]:
    if split == "train":
        return int(cfg.data.train_start), int(cfg.data.train_num)
    if split == "eval":
        return int(cfg.data.eval_start), int(cfg.data.eval_num)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def load_split(cfg, split: str, *, workers: int | None = None) -> np.ndarray:
    """Native arrays of field `cfg.modality` for `split`, stacked [N, H, W(, C)]."""
    start, num = split_range(cfg, split)
    if split == "train" and cfg.data.source == "scenes":
        e0, en = split_range(cfg, "eval")
        if start < e0 + en and e0 < start + num:
            raise ValueError(f"data: train scenes [{start}, {start + num}) overlap held-out scenes "
                             f"[{e0}, {e0 + en}); pick disjoint data.train_start/eval_start")
    if cfg.data.source == "scenes":
        arrays = scene_arrays(int(cfg.data.seed), start, num, int(cfg.resolution),
                              cache_dir=cfg.data.cache_dir, fields=(cfg.modality,),
                              workers=workers if workers is not None else int(cfg.num_workers))
        return arrays[cfg.modality]
    if cfg.data.source == "folder":
        return folder_arrays(cfg.data.folder, cfg.modality, start, num)
    raise ValueError(f"data.source must be 'scenes' or 'folder', got {cfg.data.source!r}")


def scene_arrays(seed: int, start: int, num: int, resolution: int, *, cache_dir: str | None,
                 fields=IMAGE_FIELDS, workers: int = 1) -> dict[str, np.ndarray]:
    """Scenes [start, start + num) of generator `seed`, as stacked arrays per image-like field."""
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"seed{seed}_res{resolution}_{start}-{start + num}"
        if all((cache / f"{f}.npy").exists() for f in fields):
            return {f: np.load(cache / f"{f}.npy", allow_pickle=False) for f in fields}
    from fourm.data import scenes

    out = scenes.generate_scenes(seed, start, num, resolution=resolution, workers=workers)
    stacked = _stack_fields(out, num)
    missing = [f for f in fields if f not in stacked]
    if missing:
        raise KeyError(f"scene generator returned no field(s) {missing}; has {sorted(stacked)}")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for f, arr in stacked.items():
            atomic_save_npy(cache / f"{f}.npy", arr)
    return {f: stacked[f] for f in fields}


def _stack_fields(samples, num: int) -> dict[str, np.ndarray]:
    """Stack the image-like fields of an iterable of per-scene dicts (other fields are dropped
    as they stream by, so memory holds only the arrays)."""
    items: dict[str, list] = {}
    for s in samples:
        for k in IMAGE_FIELDS:
            if k in s:
                items.setdefault(k, []).append(np.asarray(s[k]))
    items = {k: np.stack(v) for k, v in items.items()}
    for k, v in items.items():
        if v.shape[0] != num:
            raise ValueError(f"scene generator returned {v.shape[0]} {k} arrays, expected {num}")
    return items





def folder_arrays(root: str, field: str, start: int, num: int) -> np.ndarray:
    """Samples [start, start + num) of an aligned folder (`fourm.data.folder`), one field."""
    from fourm.data.folder import AlignedFolder

    ds = AlignedFolder(root)
    n = len(ds)
    if start + num > n:
        raise ValueError(f"data.folder {root}: asked for samples [{start}, {start + num}) but it "
                         f"has {n}")
    return np.stack([np.asarray(ds[i][field]) for i in range(start, start + num)])
