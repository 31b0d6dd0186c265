"""Field values <-> file bytes, by layout: what aligned folders, their writers and readers share.

Every field of the registry (`fourm.modalities.Field`) has a layout; this module turns a file of
that layout into the value samples carry (checked: size, dtype, channels, range, finiteness) and
back. A field with its own `decode` / `encode` functions gets the same checks on what they return.
Errors are `FolderError`s naming the sample, the field and the file, with the reason.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from fourm import modalities as registry
from fourm.modalities import Field

FORMAT_NAME = "fourm.aligned_folder"
FORMAT_VERSION = 1
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

# PIL modes an image file may have, per layout and channels (with words for error messages).
_IMAGE_MODES = {1: {"L": "8-bit single channel"}, 3: {"RGB": "8-bit RGB"}, 4: {"RGBA": "8-bit RGBA"}}
_LABEL_MODES = {"L": "8-bit single channel", "P": "8-bit palette"}
_WIDE_MODES = {"L": "8-bit", "I;16": "16-bit", "I;16B": "16-bit", "I": "32-bit"}


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


def extensions() -> dict[str, tuple[str, ...]]:
    """Field -> allowed file extensions (the first is what writers use), from the registry."""
    return {f.name: f.formats for f in registry.fields()}


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


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, np.float32), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Writing: value -> file bytes
# ---------------------------------------------------------------------------------------------
def encode_value(f: Field, value: Any, ext: str, *, depth_scale: float = DEFAULT_DEPTH_SCALE,
                 where: str = "") -> bytes:
    """The file bytes of `value` (a sample's field) in format `ext`."""
    if ext not in f.formats:
        raise ValueError(f"modality {f.name!r} cannot be written as .{ext}; allowed: {f.formats}")
    if f.encode is not None:
        return f.encode(value)
    if ext not in registry.LAYOUTS[f.layout][0]:
        raise ValueError(f"modality {f.name!r}: .{ext} files need the field's encode function")
    if f.layout == "depth" and ext == "png":
        return png_bytes(encode_depth_png16(np.asarray(value), depth_scale))
    if ext == "npy":
        return npy_bytes(value)
    if f.layout == "normals":
        return png_bytes(encode_normals(np.asarray(value)))
    if f.layout == "instances":
        value = np.asarray(value)
        if value.min(initial=0) < 0 or value.max(initial=0) > 65535:
            raise ValueError(f"instance ids must be in [0, 65535]{where}")
        return png_bytes(value.astype(np.uint8 if value.max(initial=0) < 256 else np.uint16))
    if ext in ("png", "jpg", "jpeg"):
        arr = np.asarray(value, np.uint8)
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        buf = io.BytesIO()
        if ext == "png":
            img.save(buf, format="PNG")
        else:
            img.save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    if ext == "json":
        return json_bytes(value)
    return (str(value) + "\n").encode("utf-8")  # text


# ---------------------------------------------------------------------------------------------
# Reading: file bytes -> checked value
# ---------------------------------------------------------------------------------------------
def decode_value(f: Field, data: bytes, ext: str, *, resolution: tuple[int, int],
                 fail: Callable[[str], FolderError], raw: bool = False,
                 depth_scale: float = DEFAULT_DEPTH_SCALE, classes=None) -> Any:
    """Decode one file of field `f` and check it; `fail(problem)` makes the error to raise.
    raw=True keeps PNG normals as uint8 (their stored form)."""
    if f.decode is not None:
        try:
            value = f.decode(data)
        except Exception as e:  # noqa: BLE001 - a user's decoder may raise anything
            raise fail(f"cannot decode .{ext} file with {f.name!r}'s decode: "
                       f"{type(e).__name__}: {e}") from None
        return check_value(f, value, resolution=resolution, fail=fail, classes=classes)
    h, w = resolution
    if f.layout in ("boxes", "json"):
        obj = load_json(data, "JSON file", fail)
        if f.layout == "json":
            if not isinstance(obj, dict):
                raise fail(f"expected a JSON object, got {type(obj).__name__}")
            return obj
        return check_boxes(obj, resolution, fail)
    if f.layout == "text":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(f"text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        return text[:-1] if text.endswith("\n") else text
    if ext == "npy":
        arr = load_npy(data, fail)
        if arr.dtype != np.float32:
            raise fail(f"wrong dtype: expected float32, got {arr.dtype}")
        return check_value(f, arr, resolution=resolution, fail=fail, classes=classes)
    # An image file.
    if f.layout == "image":
        arr = load_image(data, _IMAGE_MODES[f.channels], (h, w), fail)
        return arr[..., None] if arr.ndim == 2 else arr
    if f.layout == "normals":
        arr = load_image(data, _IMAGE_MODES[3], (h, w), fail)
        return arr if raw else decode_normals(arr)
    if f.layout == "labels":
        arr = load_image(data, _LABEL_MODES, (h, w), fail)
        return check_value(f, arr.astype(np.uint8), resolution=resolution, fail=fail, classes=classes)
    arr = load_image(data, _WIDE_MODES, (h, w), fail)
    if f.layout == "instances":
        if arr.min(initial=0) < 0:
            raise fail("negative instance ids")
        return arr.astype(np.int32)
    # depth as a 16-bit PNG
    if arr.dtype != np.uint16 and arr.dtype != np.uint8:
        raise fail(f"wrong dtype: a depth PNG must be 16-bit, got {arr.dtype}")
    return decode_depth_png16(arr, depth_scale)


def expected_array(f: Field, resolution: tuple[int, int]) -> tuple[tuple[int, ...], type]:
    """(shape, dtype) of an image-like field's value on a `resolution` pixel grid."""
    h, w = resolution
    shape = {"image": (h, w, f.channels), "normals": (h, w, 3),
             "array": (h, w) if f.channels is None else (h, w, f.channels)}.get(f.layout, (h, w))
    dtype = {"image": np.uint8, "labels": np.uint8, "instances": np.int32}.get(f.layout, np.float32)
    return shape, dtype


def check_value(f: Field, value: Any, *, resolution: tuple[int, int],
                fail: Callable[[str], FolderError], classes=None) -> Any:
    """Check a decoded value against its layout (shape, dtype, range, finiteness)."""
    if not f.is_image_like:
        if f.layout == "text" and not isinstance(value, str):
            raise fail(f"expected text, got {type(value).__name__}")
        if f.layout == "json" and not isinstance(value, dict):
            raise fail(f"expected a JSON object, got {type(value).__name__}")
        return check_boxes(value, resolution, fail) if f.layout == "boxes" else value
    arr = np.asarray(value)
    shape, dtype = expected_array(f, resolution)
    if arr.shape != shape:
        raise fail(f"wrong shape: expected {shape}, got {arr.shape}")
    if np.issubdtype(dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.integer):
            raise fail(f"wrong dtype: expected {np.dtype(dtype).name}, got {arr.dtype}")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < max(info.min, 0) or arr.max() > info.max):
            raise fail(f"values outside [{max(info.min, 0)}, {info.max}] "
                       f"(min {arr.min()}, max {arr.max()})")
        arr = arr.astype(dtype)
    else:
        if not np.issubdtype(arr.dtype, np.floating):
            raise fail(f"wrong dtype: expected float32, got {arr.dtype}")
        arr = arr.astype(np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise fail(f"{int(bad.sum())} NaN/inf values in {f.name} (first at {idx})")
        if f.layout == "depth" and (arr < 0).any():
            raise fail(f"{int((arr < 0).sum())} negative depth values")
    if f.layout == "labels" and classes and arr.max(initial=0) >= len(classes):
        raise fail(f"class id {int(arr.max())} >= number of classes {len(classes)} in dataset.json")
    return arr


def check_boxes(boxes, resolution, fail):
    h, w = resolution
    if not isinstance(boxes, list):
        raise fail(f"expected a JSON list of boxes, got {type(boxes).__name__}")
    for j, b in enumerate(boxes):
        if not isinstance(b, dict) or not isinstance(b.get("class"), str):
            raise fail(f"box {j}: expected an object with a string 'class', got {b!r}")
        box = b.get("box")
        numbers = isinstance(box, list) and all(isinstance(v, (int, float)) for v in box)
        if not (numbers and len(box) == 4):
            raise fail(f"box {j}: 'box' must be [x0, y0, x1, y1] numbers, got {box!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise fail(f"box {j}: {box} is not inside the {w}x{h} image with x0 <= x1, y0 <= y1")
    return boxes


def load_json(data: bytes, what: str, fail):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def load_npy(data: bytes, fail) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise fail(f"unreadable .npy file: {e}") from None


def load_image(data: bytes, modes: Mapping[str, str], size, fail) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                mode, (w, h) = img.mode, img.size
                if mode not in modes:
                    allowed = " or ".join(f"{m} ({d})" for m, d in modes.items())
                    raise fail(f"wrong channels/dtype: expected {allowed} image, got mode {mode!r}")
                arr = np.array(img)
    except FolderError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise fail(f"unreadable image: {e}") from None
    if (h, w) != size:
        raise fail(f"wrong size: expected {size[0]}x{size[1]} (HxW), got {h}x{w}")
    return arr
