"""Pictures of modalities: colour maps for depth, normals and labels, boxes, captioned grids.

Every function takes and returns numpy arrays (uint8 RGB for pictures) so that tokenizer
reconstructions, generated samples and reports all draw the same way:

    grid = make_grid([[rgb, colorize_depth(depth), colorize_normals(n)]], captions=[caption],
                     col_titles=["rgb", "depth", "normals"])
    save_png("grid.png", grid)
"""

from __future__ import annotations

import io
import os
import textwrap
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fourm import modalities as registry
from fourm.data.folder import atomic_write_bytes

# Depth colour map: a perceptually ordered ramp from bright yellow (near) through orange, magenta
# and blue to near-black (far), as control points interpolated to 256 entries.
_DEPTH_STOPS = np.array([[252, 253, 191], [254, 176, 120], [241, 96, 93], [183, 55, 121],
                         [114, 31, 129], [44, 17, 95], [0, 0, 4]], np.float64)
DEPTH_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_DEPTH_STOPS)),
                                _DEPTH_STOPS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def _make_palette() -> np.ndarray:
    """256 fixed, distinct label colours: the first follow fourm.data.scenes.CLASSES
    (background black, floor grey-brown, wall light grey, then one hue per shape), the rest are
    spread around the hue circle by the golden angle."""
    first = [(0, 0, 0), (140, 120, 100), (200, 200, 200), (230, 60, 60), (60, 120, 230), (70, 190, 90),
             (240, 190, 40), (170, 80, 200), (60, 200, 200), (240, 130, 40)]
    pal = np.zeros((256, 3), np.uint8)
    pal[:len(first)] = first
    for i in range(len(first), 256):
        h = (i * 0.618033988749895) % 1.0
        s, v = 0.55 + 0.4 * ((i * 7) % 5) / 4, 0.6 + 0.35 * ((i * 3) % 4) / 3
        k = np.array([5.0, 3.0, 1.0])
        pal[i] = np.round(255 * (v - v * s * np.clip(np.minimum((k + h * 6) % 6, 4 - (k + h * 6) % 6), 0, 1)))
    return pal


PALETTE = _make_palette()


def colorize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                   invalid_colour=(0, 0, 0)) -> np.ndarray:
    """float depth [H, W] -> uint8 RGB, near = bright. The range defaults to the 2nd-98th
    percentile of the valid (finite, > 0) values; invalid pixels get `invalid_colour`."""
    depth = np.asarray(depth, np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    out = np.empty(depth.shape + (3,), np.uint8)
    out[:] = invalid_colour
    if not valid.any():
        return out
    lo = np.percentile(depth[valid], 2) if vmin is None else vmin
    hi = np.percentile(depth[valid], 98) if vmax is None else vmax
    x = np.clip((depth - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    out[valid] = DEPTH_LUT[np.round(x[valid] * 255).astype(np.int64)]
    return out


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals [H, W, 3] (float, or uint8 already encoded) -> uint8 RGB (n + 1) / 2 * 255,
    the same encoding as the normals PNGs of the aligned folder."""
    normals = np.asarray(normals)
    if normals.dtype == np.uint8:
        return normals
    return np.round((np.clip(np.nan_to_num(normals), -1, 1) + 1) * 127.5).astype(np.uint8)


def colorize_semseg(labels: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Integer labels [H, W] (class or instance ids) -> uint8 RGB with a fixed palette."""
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    return palette[np.mod(labels.astype(np.int64), len(palette))]


def colorize_instance(instance: np.ndarray) -> np.ndarray:
    """Instance ids -> colours (0 = none is black); offset so instances do not reuse class hues."""
    ids = np.asarray(instance).astype(np.int64)
    return np.where((ids == 0)[..., None], 0, PALETTE[(ids + 9) % 256]).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Any picture-like array -> uint8 RGB: uint8 [H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4], or
    float in [0, 1]."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.round(np.clip(np.nan_to_num(img.astype(np.float64)), 0, 1) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img[..., :3]


def draw_boxes(rgb: np.ndarray, boxes: Sequence[Mapping], scale: float = 1.0, labels: bool = True,
               width: int | None = None) -> np.ndarray:
    """Draw boxes ({"box": [x0, y0, x1, y1], "class": ..., optional "colour"}) on a copy of an image.
    `scale` maps box coordinates to the image (e.g. 2 when drawing on a 2x upscaled picture)."""
    img = Image.fromarray(to_rgb(rgb))
    draw = ImageDraw.Draw(img)
    width = width or max(1, round(min(img.size) / 128))
    font = _font(max(8, min(img.size) // 14))
    for k, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) * scale for v in b["box"])
        label = int(b["class_id"]) if "class_id" in b else k + 3
        colour = tuple(int(c) for c in PALETTE[label % 256])
        # Half-open pixel ranges: the last covered pixel is x1 - 1 (in scaled units).
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        if labels:
            text = " ".join(str(b[k2]) for k2 in ("colour", "class") if k2 in b)
            tx, ty = x0 + width, max(0.0, y0 - font.size - 2) if y0 > font.size + 2 else y0 + width
            bbox = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), text, fill=colour, font=font)
    return np.asarray(img)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    # Nearest neighbour: label and token pictures must not blend classes.
    return np.asarray(Image.fromarray(img).resize((w, h), Image.NEAREST))


def make_grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str] | None = None,
              col_titles: Sequence[str] | None = None, cell: int | tuple[int, int] | None = None,
              pad: int = 4, background: int = 255, font_size: int | None = None) -> np.ndarray:
    """Tile pictures into one uint8 RGB image: rows x columns, optional column titles on top and
    a wrapped caption under each row. Cells are resized (nearest) to `cell` (default: the largest
    picture, at least 128 px tall)."""
    cells = [[to_rgb(c) for c in row] for row in rows]
    if not cells or not any(cells):
        raise ValueError("make_grid needs at least one picture")
    if cell is None:
        ch = max(max(c.shape[0] for c in row) for row in cells if row)
        cw = max(max(c.shape[1] for c in row) for row in cells if row)
        up = max(1, -(-128 // ch))
        cell = (ch * up, cw * up)
    ch, cw = (cell, cell) if isinstance(cell, int) else cell
    ncol = max(len(r) for r in cells)
    fs = font_size or max(10, min(16, cw // 10))
    font = _font(fs)
    line_h = fs + 4
    grid_w = pad + ncol * (cw + pad)
    chars = max(10, int(grid_w / (0.55 * fs)))
    wrapped = [textwrap.wrap(c or "", chars) if captions else [] for c in (captions or [None] * len(cells))]
    title_h = line_h + pad if col_titles else 0
    row_hs = [ch + pad + len(w) * line_h + (pad if w else 0) for w in wrapped]
    canvas = Image.new("RGB", (grid_w, pad + title_h + sum(row_hs)), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    if col_titles:
        for j, t in enumerate(col_titles):
            x = pad + j * (cw + pad)
            tw = draw.textlength(str(t), font=font)
            draw.text((x + max(0, (cw - tw) / 2), pad), str(t), fill=(0, 0, 0), font=font)
    y = pad + title_h
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(_resize(img, (ch, cw))), (pad + j * (cw + pad), y))
        for k, line in enumerate(wrapped[i]):
            draw.text((pad, y + ch + pad // 2 + k * line_h), line, fill=(20, 20, 20), font=font)
        y += row_hs[i]
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a picture as PNG atomically (temporary file + rename)."""
    arr = np.asarray(arr)
    img = arr if (arr.ndim == 2 and arr.dtype == np.uint8) else to_rgb(arr)  # keep greyscale as L
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def colorize_array(arr: np.ndarray) -> np.ndarray:
    """A float array [H, W] or [H, W, C] -> uint8 grey (first channel), min..max stretched."""
    a = np.asarray(arr, np.float64)
    a = a[..., 0] if a.ndim == 3 else a
    finite = np.isfinite(a)
    lo, hi = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 1.0)
    return to_rgb(np.where(finite, (a - lo) / max(hi - lo, 1e-12), 0.0))


def picture(field: str, value) -> np.ndarray:
    """The picture of an image-like field's value, by its registry layout."""
    layout = registry.field(field).layout
    draw = {"depth": colorize_depth, "normals": colorize_normals, "labels": colorize_semseg,
            "instances": colorize_instance, "array": colorize_array}.get(layout, to_rgb)
    return draw(value)


def sample_row(sample: Mapping, scale: int = 1) -> tuple[list[np.ndarray], list[str]]:
    """The viewer's pictures of one sample (its image-like fields in registry order, then the
    boxes drawn on the RGB) and titles."""
    pics, titles = [], []
    for f in registry.fields():
        if f.name in sample and f.is_image_like:
            pics.append(picture(f.name, sample[f.name])); titles.append(f.name)
    if "boxes" in sample and "rgb" in sample:
        big = np.asarray(Image.fromarray(to_rgb(sample["rgb"])).resize(
            (sample["rgb"].shape[1] * scale, sample["rgb"].shape[0] * scale), Image.NEAREST))
        pics.append(draw_boxes(big, sample["boxes"], scale=scale)); titles.append("boxes")
    return pics, titles
