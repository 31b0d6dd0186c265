"""Structure as text, 4M-21 style: boxes, metadata and colour palettes as value-bin words.

Every number becomes a value-bin word `v<g>=<bin>` (g in 0..3, bin in 0..bins-1), which the text
tokenizer maps to one reserved id each, so a structured sample costs a few tokens per item:

* boxes    `v0=xmin v1=ymin v2=xmax v3=ymax <class name>` per box, in the given order; coordinates
           are normalised by the image size (x by width, y by height) and binned with
           `bin = round(u * (bins - 1))`, so a decoded coordinate is within half a bin
           (`size / (bins - 1) / 2` pixels) of the original;
* metadata `v1=<field index> v0=<bin>` per present field, in `METADATA_SPEC` order (the field
           index is the spec's fixed id, so chunks can be dropped or masked independently);
* palette  `v0=<count>` then `v1=<r> v2=<g> v3=<b>` per colour, channels 0..255 binned.

Values outside a field's documented range are clipped to it (they saturate, as 4M-21's bins do).
Parsers take `strict=True` (raise on malformed text, naming the word) or `strict=False` (skip
what does not parse: the mode for decoding model samples).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from fourm.text_layout import DEFAULT_VALUE_BINS

_VALUE_RE = re.compile(r"v([0-3])=(0|[1-9]\d*)")


@dataclasses.dataclass(frozen=True)
class MetadataField:
    """One metadata field: fixed index (its `v1=` word) and the value range mapped onto the bins."""

    index: int
    min: float
    max: float
    integer: bool = False
    doc: str = ""


# Field -> bin range. Indices are part of the token format: append new fields, never renumber.
# Integer fields whose range fits in the bins are stored exactly (bin = value - min); all others
# map [min, max] linearly onto [0, bins - 1] and clip outside it.
METADATA_SPEC: dict[str, MetadataField] = {
    # The fields of `fourm.data.scenes.scene_metadata`; ranges cover the generator's output with
    # margin (so other data in the same units fits too). Units as the generator documents them.
    "object_count": MetadataField(0, 0, 16, True, "objects visible in the image"),
    "brightness": MetadataField(1, 0.0, 1.0, doc="mean luma (Rec. 601) of the RGB image, 0..1"),
    "contrast": MetadataField(2, 0.0, 0.5, doc="standard deviation of luma"),
    "colourfulness": MetadataField(3, 0.0, 150.0, doc="Hasler-Suesstrunk colourfulness, 0-255 scale"),
    "depth_min": MetadataField(4, 0.0, 16.0, doc="nearest depth, metres"),
    "depth_max": MetadataField(5, 0.0, 16.0, doc="farthest depth, metres"),
    "depth_mean": MetadataField(6, 0.0, 16.0, doc="mean depth, metres"),
    "floor_fraction": MetadataField(7, 0.0, 1.0, doc="fraction of pixels showing the floor"),
    "wall_fraction": MetadataField(8, 0.0, 1.0, doc="fraction of pixels showing walls"),
    "object_fraction": MetadataField(9, 0.0, 1.0, doc="fraction of pixels showing objects"),
    "camera_height": MetadataField(10, 0.0, 4.0, doc="camera height above the floor, metres"),
    "camera_pitch": MetadataField(11, -90.0, 90.0, doc="camera pitch (down positive), degrees"),
    "camera_yaw": MetadataField(12, -180.0, 180.0, doc="camera yaw, degrees"),
    "fov": MetadataField(13, 0.0, 180.0, doc="vertical field of view, degrees"),
    "light_azimuth": MetadataField(14, 0.0, 360.0, doc="light azimuth, degrees"),
    "light_elevation": MetadataField(15, 0.0, 90.0, doc="light elevation, degrees"),
}


# ------------------------------------------------------------------------------------ binning
def quantize(u: float, bins: int) -> int:
    """A value in [0, 1] -> bin in [0, bins - 1] (clipped)."""
    if not math.isfinite(u):
        raise ValueError(f"cannot bin a non-finite value {u!r}")
    return int(min(max(round(u * (bins - 1)), 0), bins - 1))


def dequantize(b: int, bins: int) -> float:
    return b / (bins - 1)


def _image_hw(image_size) -> tuple[float, float]:
    if isinstance(image_size, (int, float)):
        h = w = float(image_size)
    else:
        h, w = (float(s) for s in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _check_bins(bins: int) -> int:
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return int(bins)


def _values(words: Sequence[str], start: int, groups: Sequence[int], bins: int):
    """Parse `v<g>=<bin>` words at words[start:] with the given groups; None if they don't fit."""
    out = []
    for k, g in enumerate(groups):
        if start + k >= len(words):
            return None
        m = _VALUE_RE.fullmatch(words[start + k])
        if not m or int(m.group(1)) != g or int(m.group(2)) >= bins:
            return None
        out.append(int(m.group(2)))
    return out


def _fail(kind: str, words: Sequence[str], i: int, expected: str):
    got = words[i] if i < len(words) else "<end of text>"
    raise ValueError(f"{kind} text: word {i} is {got!r}, expected {expected} "
                     f"(text: {' '.join(words)[:120]!r})")


# ------------------------------------------------------------------------------------ boxes
def boxes_to_text(boxes: Sequence[Mapping[str, Any]], image_size, bins: int = DEFAULT_VALUE_BINS) -> str:
    """Boxes `[{"class": name, "box": [x0, y0, x1, y1]}, ...]` (pixels) -> text ("" if none)."""
    bins = _check_bins(bins)
    h, w = _image_hw(image_size)
    words = []
    for k, b in enumerate(boxes):
        try:
            name, box = b["class"], b["box"]
        except (KeyError, TypeError):
            raise ValueError(f"box {k}: expected a mapping with 'class' and 'box', got {b!r:.100}") from None
        name = str(name)
        if not name.strip() or any(_VALUE_RE.fullmatch(t) for t in name.split()):
            raise ValueError(f"box {k}: class name {name!r} is empty or contains a value word")
        x0, y0, x1, y1 = _box4(box, k)
        words += [f"v0={quantize(x0 / w, bins)}", f"v1={quantize(y0 / h, bins)}",
                  f"v2={quantize(x1 / w, bins)}", f"v3={quantize(y1 / h, bins)}", " ".join(name.split())]
    return " ".join(words)


def _box4(box, k: int) -> tuple[float, float, float, float]:
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"box {k}: expected 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in arr)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {k}: corners out of order, got [x0, y0, x1, y1] = {list(arr)}")
    return x0, y0, x1, y1


def text_to_boxes(text: str, image_size, bins: int = DEFAULT_VALUE_BINS, *,
                  strict: bool = True) -> list[dict]:
    """Inverse of `boxes_to_text`: `[{"class": name, "box": [x0, y0, x1, y1]}]` in pixels."""
    bins = _check_bins(bins)
    h, w = _image_hw(image_size)
    words = text.split()
    out, i = [], 0
    while i < len(words):
        vals = _values(words, i, (0, 1, 2, 3), bins)
        name_end = i + 4
        while vals is not None and name_end < len(words) and not _VALUE_RE.fullmatch(words[name_end]):
            name_end += 1
        if vals is None or name_end == i + 4:
            if strict:
                _fail("boxes", words, i if vals is None else i + 4,
                      "'v0=.. v1=.. v2=.. v3=..' followed by a class name" if vals is None
                      else "a class name after the four coordinates")
            i += 1  # resynchronise on the next v0= word
            while i < len(words) and not words[i].startswith("v0="):
                i += 1
            continue
        x0, y0, x1, y1 = (dequantize(v, bins) * s for v, s in zip(vals, (w, h, w, h)))
        if (x1 < x0 or y1 < y0) and strict:
            raise ValueError(f"boxes text: box at word {i} has corners out of order: {vals}")
        out.append({"class": " ".join(words[i + 4:name_end]), "box": [x0, y0, x1, y1]})
        i = name_end
    return out


# ------------------------------------------------------------------------------------ metadata
def _field_bins(f: MetadataField, bins: int) -> bool:
    """True when an integer field is stored exactly (its whole range fits in the bins)."""
    return f.integer and (f.max - f.min) <= bins - 1


def metadata_to_text(meta: Mapping[str, Any], spec: Mapping[str, MetadataField] | None = None,
                     bins: int = DEFAULT_VALUE_BINS, *, strict: bool = True) -> str:
    """`{field: number}` -> `v1=<index> v0=<bin> ...` in spec order. Unknown fields: error if strict."""
    spec = METADATA_SPEC if spec is None else spec
    bins = _check_bins(bins)
    unknown = sorted(set(meta) - set(spec))
    if unknown and strict:
        raise ValueError(f"metadata fields {unknown} are not in the metadata spec; known fields: "
                         f"{list(spec)} (add them to METADATA_SPEC or pass strict=False)")
    words = []
    for name, f in spec.items():
        if name not in meta:
            continue
        if f.index >= bins:
            raise ValueError(f"metadata field {name!r} has index {f.index} >= bins {bins}")
        v = meta[name]
        try:
            v = float(np.asarray(v, dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            raise ValueError(f"metadata field {name!r}: expected a number, got {meta[name]!r:.80}") from None
        if not math.isfinite(v):
            raise ValueError(f"metadata field {name!r}: value {v} is not finite")
        if _field_bins(f, bins):
            b = int(min(max(round(v - f.min), 0), f.max - f.min))
        else:
            b = quantize((v - f.min) / (f.max - f.min), bins)
        words += [f"v1={f.index}", f"v0={b}"]
    return " ".join(words)


def text_to_metadata(text: str, spec: Mapping[str, MetadataField] | None = None,
                     bins: int = DEFAULT_VALUE_BINS, *, strict: bool = True) -> dict[str, float | int]:
    """Inverse of `metadata_to_text` (values at bin centres; integer fields as int)."""
    spec = METADATA_SPEC if spec is None else spec
    bins = _check_bins(bins)
    by_index = {f.index: (name, f) for name, f in spec.items()}
    words = text.split()
    out: dict[str, float | int] = {}
    i = 0
    while i < len(words):
        vals = _values(words, i, (1, 0), bins)
        if vals is None or vals[0] not in by_index:
            if strict:
                _fail("metadata", words, i, f"'v1=<field index> v0=<bin>' with a field index in "
                      f"{sorted(by_index)}")
            i += 1
            continue
        name, f = by_index[vals[0]]
        if _field_bins(f, bins):
            v: float | int = int(f.min + vals[1])
        else:
            v = f.min + dequantize(vals[1], bins) * (f.max - f.min)
            v = int(round(v)) if f.integer else v
        out[name] = v
        i += 2
    return out


def metadata_tolerance(name: str, spec: Mapping[str, MetadataField] | None = None,
                       bins: int = DEFAULT_VALUE_BINS) -> float:
    """Largest round-trip error of a field (half a bin; 0 for exactly stored integers)."""
    f = (METADATA_SPEC if spec is None else spec)[name]
    if _field_bins(f, bins):
        return 0.0
    half = (f.max - f.min) / (bins - 1) / 2
    return max(half, 0.5) if f.integer else half


# ------------------------------------------------------------------------------------ palette
def palette_to_text(colours, bins: int = DEFAULT_VALUE_BINS) -> str:
    """RGB colours (uint8-range numbers, shape [K, 3]) -> `v0=K v1=r v2=g v3=b ...`."""
    bins = _check_bins(bins)
    arr = np.asarray(colours, dtype=np.float64).reshape(-1, 3) if len(colours) else np.zeros((0, 3))
    if arr.shape[0] >= bins:
        raise ValueError(f"palette of {arr.shape[0]} colours does not fit a count bin (< {bins})")
    if not np.all(np.isfinite(arr)):
        raise ValueError("palette colours must be finite numbers")
    words = [f"v0={arr.shape[0]}"]
    for c in arr:
        words += [f"v{g + 1}={quantize(float(c[g]) / 255.0, bins)}" for g in range(3)]
    return " ".join(words)


def text_to_palette(text: str, bins: int = DEFAULT_VALUE_BINS, *, strict: bool = True) -> np.ndarray:
    """Inverse of `palette_to_text`: uint8 [K, 3] (within half a bin of the original)."""
    bins = _check_bins(bins)
    words = text.split()
    count = _values(words, 0, (0,), bins)
    if count is None:
        if strict:
            _fail("palette", words, 0, "'v0=<count>'")
        return np.zeros((0, 3), np.uint8)
    cols = []
    for k in range(count[0]):
        rgb = _values(words, 1 + 3 * k, (1, 2, 3), bins)
        if rgb is None:
            if strict:
                _fail("palette", words, 1 + 3 * k, f"colour {k} as 'v1=<r> v2=<g> v3=<b>'")
            break
        cols.append([round(dequantize(b, bins) * 255.0) for b in rgb])
    if strict and len(words) != 1 + 3 * count[0]:
        _fail("palette", words, 1 + 3 * count[0], "<end of text>")
    return np.asarray(cols, np.uint8).reshape(-1, 3)


def palette_from_image(rgb: np.ndarray, k: int = 5, levels: int = 8,
                       mask: np.ndarray | None = None) -> np.ndarray:
    """Deterministic palette: the k most frequent cells of a `levels`^3 colour grid, as mean colours.

    Frequency ties go to the lower cell index, so the same image always gives the same palette.
    """
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"palette_from_image needs uint8 [H, W, 3], got {img.dtype} {img.shape}")
    px = img.reshape(-1, 3).astype(np.int64)
    if mask is not None:
        px = px[np.asarray(mask, bool).reshape(-1)]
    if px.shape[0] == 0:
        return np.zeros((0, 3), np.uint8)
    q = px * levels // 256
    cell = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    counts = np.bincount(cell, minlength=levels ** 3)
    top = np.argsort(-counts, kind="stable")[:k]
    top = top[counts[top] > 0]
    sums = np.stack([np.bincount(cell, weights=px[:, c], minlength=levels ** 3) for c in range(3)], -1)
    return np.round(sums[top] / counts[top, None]).astype(np.uint8)
