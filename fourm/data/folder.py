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

A sample is read from the same stem in every modality, so a sample is aligned or it is not
emitted at all: any problem (missing file, stem in only some modalities, wrong size, dtype or
channels, unreadable image, NaN/inf depth, invalid JSON, non-UTF-8 text) raises `FolderError`
naming the sample, the modality and the file, or, with `skip_bad=True`, drops the whole sample
and records why (`AlignedFolder.skipped`, `write_report`). See docs/data_format.md.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from fourm.io import atomic_write

FORMAT_NAME = "fourm.aligned_folder"
FORMAT_VERSION = 1
# Modality -> allowed file extensions; the first is what the writer uses by default.
EXTENSIONS = {"rgb": ("png", "jpg", "jpeg"), "depth": ("npy", "png"), "normals": ("png", "npy"),
              "semseg": ("png",), "instance": ("png",), "boxes": ("json",), "caption": ("txt",),
              "metadata": ("json",)}
MODALITIES = list(EXTENSIONS)
INTRINSIC_KEYS = ("fx", "fy", "cx", "cy")
DEFAULT_DEPTH_SCALE = 0.001  # metres per unit of a 16-bit depth PNG (millimetres)
CONVENTIONS = {
    "pixel": "pixel (u, v) = (column, row) has its centre at image coordinates (u, v); "
             "boxes are half-open pixel ranges [x0, x1) x [y0, y1)",
    "depth": "metres along the camera z axis (not ray length); 0 = no measurement",
    "normals": "outward unit normals in the camera frame, OpenCV axes x right, y down, z forward; "
               "PNG stores round((n + 1) / 2 * 255)",
    "back_projection": "X = (u - cx) * z / fx, Y = (v - cy) * z / fy, Z = z",
}


class FolderError(ValueError):
    """A problem with an aligned folder, naming the sample, the modality and the file."""

    def __init__(self, problem: str, *, sample: str | None = None, modality: str | None = None,
                 path: str | os.PathLike | None = None):
        self.problem, self.sample, self.modality = problem, sample, modality
        self.path = None if path is None else str(path)
        where = ", ".join(w for w in (sample is not None and f"sample {sample!r}",
                                      modality is not None and f"modality {modality!r}") if w)
        if self.path:
            where = f"{where} ({self.path})" if where else self.path
        super().__init__(f"{where or 'aligned folder'}: {problem}")

    def __reduce__(self):  # keep the fields through pickling (e.g. into worker processes)
        return (_make_folder_error, (self.problem, self.sample, self.modality, self.path))

    def to_json(self) -> dict:
        return {"sample": self.sample, "modality": self.modality, "path": self.path, "problem": self.problem}


def _make_folder_error(problem, sample, modality, path):
    return FolderError(problem, sample=sample, modality=modality, path=path)


# ---------------------------------------------------------------------------------------------
# Encodings shared with the TFDS builders
# ---------------------------------------------------------------------------------------------
def encode_normals(n: np.ndarray) -> np.ndarray:
    return np.round((np.clip(n, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def decode_normals(u8: np.ndarray) -> np.ndarray:
    """uint8 PNG values -> float32 unit vectors (near-zero vectors, e.g. 128-grey, stay zero)."""
    n = u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(norm > 0.5, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def encode_depth_png16(depth: np.ndarray, scale: float) -> np.ndarray:
    q = np.round(depth / scale)
    if q.max(initial=0) > 65535:
        raise ValueError(f"depth {float(depth.max()):.3f} m does not fit a 16-bit PNG at scale "
                         f"{scale} m/unit "
                         f"(max {65535 * scale:.3f} m); use .npy or a larger depth_scale")
    return q.astype(np.uint16)


def decode_depth_png16(u16: np.ndarray, scale: float) -> np.ndarray:
    return (u16.astype(np.float32) * np.float32(scale)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
atomic_write_bytes = atomic_write  # the data modules' name for fourm.io.atomic_write


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_sample(root: str | os.PathLike, stem: str, sample: Mapping[str, Any], *,
                 exts: Mapping[str, str] | None = None, depth_scale: float = DEFAULT_DEPTH_SCALE,
                 per_sample_intrinsics: bool = False) -> None:
    """Write the modalities present in `sample` (keys as `generate_scene`) under `root`."""
    root, exts = Path(root), {m: EXTENSIONS[m][0] for m in MODALITIES} | dict(exts or {})
    for mod in MODALITIES:
        if mod not in sample:
            continue
        value, ext = sample[mod], exts[mod]
        if ext not in EXTENSIONS[mod]:
            raise ValueError(f"modality {mod!r} cannot be written as .{ext}; allowed: {EXTENSIONS[mod]}")
        if mod == "metadata" and per_sample_intrinsics:
            value = {**value, **{k: float(sample["intrinsics"][k]) for k in INTRINSIC_KEYS}}
        if mod == "depth" and ext == "png":
            data = png_bytes(encode_depth_png16(value, depth_scale))
        elif ext == "npy":
            buf = io.BytesIO()
            np.save(buf, np.asarray(value, np.float32), allow_pickle=False)
            data = buf.getvalue()
        elif mod == "normals":
            data = png_bytes(encode_normals(value))
        elif mod == "instance":
            value = np.asarray(value)
            if value.min(initial=0) < 0 or value.max(initial=0) > 65535:
                raise ValueError(f"instance ids must be in [0, 65535] for sample {stem!r}")
            data = png_bytes(value.astype(np.uint8 if value.max(initial=0) < 256 else np.uint16))
        elif ext in ("png", "jpg", "jpeg"):
            img = Image.fromarray(np.asarray(value, np.uint8))
            buf = io.BytesIO()
            if ext == "png":
                img.save(buf, format="PNG")
            else:
                img.save(buf, format="JPEG", quality=95)
            data = buf.getvalue()
        elif ext == "json":
            data = _json_bytes(value)
        else:  # caption
            data = (str(value) + "\n").encode("utf-8")
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
            mods = {m: (dict(exts or {}).get(m) or EXTENSIONS[m][0]) for m in MODALITIES if m in sample}
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


from fourm.data.folder_reader import AlignedFolder  # noqa: E402,F401  (re-export: one import path)
