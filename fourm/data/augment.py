"""Multi-modal augmentation: one random crop and flip applied consistently to every field.

    aug = Augment(seed=0, hflip=0.5, crop=(0.7, 1.0))
    out = aug(sample, index)          # a new sample; the same (seed, index) -> the same result

Per sample, a square-aspect crop (side = a fraction in `crop` of the image side, at a uniform
position) is cut from every image-like field and resized back to the full size, then, with
probability `hflip`, everything is mirrored left-right. How each field follows comes from its
registry layout (`fourm.modalities.Field`), so a user's registered field is augmented too:

  image, array       bilinear resampling
  labels, instances  nearest (ids are never blended)
  depth              nearest (metres along z do not change under crop or flip; no blending of
                     valid depth with the 0 = no-measurement pixels)
  normals            bilinear, renormalised; under the flip the x component is negated (camera
                     frame, OpenCV axes: x right, see docs/data_format.md); invalid (zero) stays zero
  boxes              moved and scaled with the crop (clipped; boxes left empty are dropped),
                     mirrored as x0' = W - x1, x1' = W - x0 (half-open pixel ranges)
  intrinsics         fx, fy scaled, cx, cy moved with the crop; cx' = W - 1 - cx under the flip
  text               with `flip_text=True`, the words "left" and "right" swap under the flip
  json (metadata)    unchanged

Pixel convention (docs/data_format.md): pixel u has its centre at coordinate u, so output pixel
i samples the crop at x0 + (i + 0.5) * cw / W - 0.5.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from fourm import modalities as registry


@dataclasses.dataclass(frozen=True)
class Params:
    """One sample's draw: crop box (x0, y0, width, height) in pixels and the flip."""

    x0: float
    y0: float
    cw: float
    ch: float
    flip: bool


@dataclasses.dataclass(frozen=True)
class Augment:
    seed: int = 0
    hflip: float = 0.0  # probability of a left-right flip
    crop: tuple[float, float] = (1.0, 1.0)  # crop side as a fraction of the image side (range)
    flip_text: bool = True  # swap "left" / "right" in text fields of flipped samples

    def __post_init__(self):
        lo, hi = self.crop
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"augment.hflip is a probability in [0, 1], got {self.hflip}")

    @classmethod
    def from_config(cls, c) -> "Augment | None":
        """From a config section (enabled, seed, hflip, crop, flip_text); None when disabled."""
        if c is None or not c.get("enabled", False):
            return None
        return cls(seed=int(c.get("seed", 0)), hflip=float(c.get("hflip", 0.0)),
                   crop=tuple(float(v) for v in c.get("crop", (1.0, 1.0))),
                   flip_text=bool(c.get("flip_text", True)))

    def params(self, index: int, size: tuple[int, int]) -> Params:
        h, w = size
        rng = np.random.default_rng([int(self.seed), int(index)])
        frac = rng.uniform(*self.crop)
        cw, ch = frac * w, frac * h
        x0, y0 = rng.uniform(0.0, w - cw), rng.uniform(0.0, h - ch)
        return Params(float(x0), float(y0), float(cw), float(ch), bool(rng.uniform() < self.hflip))

    def __call__(self, sample: Mapping[str, Any], index: int) -> dict:
        size = image_size(sample)
        if size is None:
            return dict(sample)
        return apply(sample, self.params(index, size), size, flip_text=self.flip_text)


def image_size(sample: Mapping[str, Any]) -> tuple[int, int] | None:
    for k, v in sample.items():
        if k not in registry.RESERVED_FIELDS and k in registry.field_names() and \
                registry.field(k).is_image_like:
            return tuple(np.shape(v)[:2])
    return None


def apply(sample: Mapping[str, Any], p: Params, size: tuple[int, int], *,
          flip_text: bool = True) -> dict:
    """`sample` with the crop and flip `p` applied to every field (see the module docstring)."""
    h, w = size
    out = dict(sample)
    for name, value in sample.items():
        if name == "intrinsics":
            out[name] = _intrinsics(value, p, size)
            continue
        if name in registry.RESERVED_FIELDS or name not in registry.field_names():
            continue  # not a field (e.g. "_index"): left alone
        f = registry.field(name)
        if f.is_image_like:
            arr = np.asarray(value)
            if arr.shape[:2] != (h, w):
                raise ValueError(f"augment: field {name!r} is {arr.shape[0]}x{arr.shape[1]}, the "
                                 f"sample's image size is {h}x{w}")
            out[name] = _image(f.layout, arr, p, size)
        elif f.layout == "boxes":
            out[name] = _boxes(value, p, size)
        elif f.layout == "text" and p.flip and flip_text:
            out[name] = _swap_left_right(value)
    return out


def resample(arr: np.ndarray, p: Params, size: tuple[int, int], method: str) -> np.ndarray:
    """The crop box of `arr` [H, W(, C)] resized to `size`; "nearest" or "linear"."""
    h, w = size
    ys = p.y0 + (np.arange(h) + 0.5) * p.ch / h - 0.5
    xs = p.x0 + (np.arange(w) + 0.5) * p.cw / w - 0.5
    if method == "nearest":
        yi = np.clip(np.floor(ys + 0.5).astype(np.int64), 0, arr.shape[0] - 1)
        xi = np.clip(np.floor(xs + 0.5).astype(np.int64), 0, arr.shape[1] - 1)
        return arr[yi][:, xi]
    ys = np.clip(ys, 0, arr.shape[0] - 1)
    xs = np.clip(xs, 0, arr.shape[1] - 1)
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, arr.shape[0] - 1), np.minimum(x0 + 1, arr.shape[1] - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    if arr.ndim == 3:
        wy, wx = wy[..., None], wx[..., None]
    a = arr.astype(np.float64)
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bottom = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def _is_identity_crop(p: Params, size) -> bool:
    return p.x0 == 0 and p.y0 == 0 and p.cw == size[1] and p.ch == size[0]


def _image(layout: str, arr: np.ndarray, p: Params, size) -> np.ndarray:
    if layout == "normals" and arr.dtype == np.uint8:
        raise ValueError("augment: normals must be float unit vectors (decoded), not uint8 PNG values")
    if not _is_identity_crop(p, size):
        method = "nearest" if layout in ("labels", "instances", "depth") else "linear"
        res = resample(arr, p, size, method)
        if layout == "normals":
            norm = np.linalg.norm(res, axis=-1, keepdims=True)
            res = np.where(norm > 0.5, res / np.maximum(norm, 1e-6), 0.0)
        if np.issubdtype(arr.dtype, np.integer) and method == "linear":
            info = np.iinfo(arr.dtype)
            res = np.clip(np.round(res), info.min, info.max)
        arr = res.astype(arr.dtype)
    if p.flip:
        arr = arr[:, ::-1].copy()
        if layout == "normals":
            arr[..., 0] = -arr[..., 0]  # x right in the camera frame: mirrored, it points left
            arr[..., 0] += 0.0  # no -0.0 (keeps flip twice an exact, bitwise identity on zeros)
    return np.ascontiguousarray(arr)


def _boxes(boxes, p: Params, size) -> list:
    h, w = size
    sx, sy = w / p.cw, h / p.ch
    out = []
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b["box"])
        x0, x1 = np.clip([(x0 - p.x0) * sx, (x1 - p.x0) * sx], 0, w)
        y0, y1 = np.clip([(y0 - p.y0) * sy, (y1 - p.y0) * sy], 0, h)
        if x1 <= x0 or y1 <= y0:
            continue  # cropped away
        if p.flip:
            x0, x1 = w - x1, w - x0
        out.append({**b, "box": [float(x0), float(y0), float(x1), float(y1)]})
    return out


def _intrinsics(intr: Mapping[str, float], p: Params, size) -> dict:
    h, w = size
    sx, sy = w / p.cw, h / p.ch
    fx, fy = float(intr["fx"]) * sx, float(intr["fy"]) * sy
    cx = (float(intr["cx"]) - p.x0 + 0.5) * sx - 0.5
    cy = (float(intr["cy"]) - p.y0 + 0.5) * sy - 0.5
    if p.flip:
        cx = w - 1 - cx
    return {**intr, "fx": fx, "fy": fy, "cx": cx, "cy": cy}


_LR = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT",
         "RIGHT": "LEFT"}


def _swap_left_right(text: str) -> str:
    return _LR.sub(lambda m: _SWAP[m.group(0)], text)
