"""The aligned-folder format: one file per (modality, sample), `DIR/<modality>/<stem>.<ext>`.

    DIR/dataset.json            modalities + file types, resolution, intrinsics, conventions
    DIR/rgb/<stem>.png          uint8 RGB (.jpg / .jpeg also read)
    DIR/depth/<stem>.npy        float32 [H, W] metres, camera z; or 16-bit .png x depth_scale
    DIR/normals/<stem>.png      uint8 RGB = round((n + 1) / 2 * 255), camera frame (OpenCV axes);
                                or float32 [H, W, 3] .npy
    DIR/semseg/<stem>.png       8-bit class ids (mode L or P)
    DIR/instance/<stem>.png     8- or 16-bit instance ids, 0 = none
    DIR/boxes/<stem>.json       [{"class": str, "box": [x0, y0, x1, y1], ...}, ...] pixels
    DIR/caption/<stem>.txt      UTF-8 text
    DIR/metadata/<stem>.json    {name: number, ...}; per-sample intrinsics as fx, fy, cx, cy
    DIR/<field>/<stem>.<ext>    any field registered in `fourm.modalities` (layout + formats)

A sample is read from the same stem in every modality, so a sample is aligned or it is not
emitted at all: any problem (missing file, stem in only some modalities, wrong size, dtype or
channels, unreadable image, NaN/inf depth, invalid JSON, non-UTF-8 text) raises `FolderError`
naming the sample, the modality and the file, or, with `skip_bad=True`, drops the whole sample
and records why (`AlignedFolder.skipped`, `write_report`). See docs/data_format.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fourm import modalities as registry
from fourm.data import fields
# One import path for users: the format's names, errors and codecs, and the reader.
from fourm.data.fields import (CONVENTIONS, DEFAULT_DEPTH_SCALE, FORMAT_NAME, FORMAT_VERSION,
                               INTRINSIC_KEYS, FolderError, decode_depth_png16, decode_normals,
                               encode_depth_png16, encode_normals, png_bytes)
from fourm.data.folder_reader import AlignedFolder
from fourm.io import atomic_write

atomic_write_bytes = atomic_write  # the data modules' name for fourm.io.atomic_write

__all__ = ["AlignedFolder", "CONVENTIONS", "DEFAULT_DEPTH_SCALE", "FORMAT_NAME", "FORMAT_VERSION",
           "FolderError", "INTRINSIC_KEYS", "atomic_write_bytes", "decode_depth_png16", "decode_normals",
           "default_exts", "encode_depth_png16", "encode_normals", "png_bytes", "stem_for", "write_dataset",
           "write_dataset_json", "write_sample"]


def default_exts(names: Iterable[str]) -> dict[str, str]:
    """Field -> the file extension writers use by default (the registry's first format)."""
    return {m: registry.field(m).formats[0] for m in names}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_sample(root: str | os.PathLike, stem: str, sample: Mapping[str, Any], *,
                 exts: Mapping[str, str] | None = None, depth_scale: float = DEFAULT_DEPTH_SCALE,
                 per_sample_intrinsics: bool = False) -> None:
    """Write the fields present in `sample` (keys as `generate_scene`, or any registered
    field) under `root`."""
    root = Path(root)
    names = [m for m in sample if m not in registry.RESERVED_FIELDS]
    exts = default_exts(names) | dict(exts or {})
    for mod in names:
        value, ext = sample[mod], exts[mod]
        f = registry.field(mod)
        if f.layout == "json" and mod == "metadata" and per_sample_intrinsics:
            value = {**value, **{k: float(sample["intrinsics"][k]) for k in INTRINSIC_KEYS}}
        data = fields.encode_value(f, value, ext, depth_scale=depth_scale, where=f" for sample {stem!r}")
        atomic_write_bytes(root / mod / f"{stem}.{ext}", data)


def write_dataset_json(root: str | os.PathLike, *, modalities: Mapping[str, str], resolution: Sequence[int],
                       intrinsics: Mapping[str, float] | None, num_samples: int,
                       classes: Sequence[str] | None = None, depth_scale: float = DEFAULT_DEPTH_SCALE,
                       source: Mapping[str, Any] | None = None) -> Path:
    spec = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_samples": int(num_samples),
            "resolution": [int(resolution[0]), int(resolution[1])],
            "modalities": dict(modalities), "depth_scale": float(depth_scale),
            "intrinsics": None if intrinsics is None else {k: float(intrinsics[k]) for k in INTRINSIC_KEYS},
            "classes": None if classes is None else list(classes), "conventions": CONVENTIONS,
            "source": dict(source or {})}
    path = Path(root) / "dataset.json"
    atomic_write_bytes(path, (json.dumps(spec, indent=2) + "\n").encode("utf-8"))
    return path


def stem_for(index: int, width: int = 6) -> str:
    return f"{index:0{width}d}"


def write_dataset(root: str | os.PathLike, samples: Iterable[Mapping[str, Any]],
                  resolution: int | Sequence[int], intrinsics: Mapping[str, float] | str | None = "auto", *,
                  stems: Sequence[str] | None = None, exts: Mapping[str, str] | None = None,
                  classes: Sequence[str] | None = None, depth_scale: float = DEFAULT_DEPTH_SCALE,
                  source: Mapping[str, Any] | None = None) -> Path:
    """Write samples (stems 000000, 000001, ... unless given), then dataset.json (last, so a
    folder with a dataset.json is complete).

    intrinsics: the dataset-level camera; "auto" takes the first sample's. A sample whose own
    `intrinsics` differ from the dataset-level ones (all samples, if None) gets them in its
    metadata file as fx, fy, cx, cy, which readers prefer over dataset.json.
    """
    resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    mods: dict[str, str] | None = None
    count = 0
    for i, sample in enumerate(samples):
        stem = stems[i] if stems is not None else stem_for(i)
        if mods is None:
            names = [m for m in sample if m not in registry.RESERVED_FIELDS]
            mods = default_exts(names) | {m: e for m, e in dict(exts or {}).items() if m in names}
            if intrinsics == "auto":
                intrinsics = sample.get("intrinsics")
        own = sample.get("intrinsics")
        per_sample = own is not None and "metadata" in sample and (
            intrinsics is None or any(float(own[k]) != float(intrinsics[k]) for k in INTRINSIC_KEYS))
        write_sample(root, stem, sample, exts=mods, depth_scale=depth_scale, per_sample_intrinsics=per_sample)
        count += 1
    if intrinsics == "auto":  # no samples
        intrinsics = None
    return write_dataset_json(root, modalities=mods or {}, resolution=resolution, intrinsics=intrinsics,
                              num_samples=count, classes=classes, depth_scale=depth_scale, source=source)

