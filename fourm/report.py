"""Pictures and the HTML report of a run: loss curves as PNG, tables, image galleries.

Only Pillow and numpy: a report must render on any machine that ran the pipeline.
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fourm.io import atomic_write

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill is skipped, the rest is still a curve
    return out


def plot_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
                title: str = "", width: int = 640, height: int = 360, log_y: bool = False) -> Path:
    """Line plot of {name: (x, y)} to a PNG (axes, ticks, legend), written atomically."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 190, 30, height - 40
    xs = [np.asarray(x, float) for x, _ in series.values() if len(x)]
    ys = [np.asarray(y, float) for _, y in series.values() if len(y)]
    if title:
        d.text((left, 8), title, fill="black")
    if not xs:
        d.text((left, height // 2), "no data", fill="black")
        return _save(img, path)
    tf = (lambda v: np.log10(np.maximum(v, 1e-12))) if log_y else (lambda v: v)
    allx = np.concatenate(xs)
    ally = tf(np.concatenate(ys))
    ally = ally[np.isfinite(ally)]
    x0, x1 = float(allx.min()), float(allx.max()) or 1.0
    y0, y1 = (float(ally.min()), float(ally.max())) if ally.size else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yy = px(x0, yv)
        d.line([left - 4, yy, left, yy], fill="black")
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        d.text((4, yy - 6), label, fill="black")
        xv = x0 + (x1 - x0) * i / 4
        xx, _ = px(xv, y0)
        d.line([xx, bottom, xx, bottom + 4], fill="black")
        d.text((xx - 10, bottom + 8), f"{xv:.0f}", fill="black")
    for k, (name, (x, y)) in enumerate(series.items()):
        colour = _PALETTE[k % len(_PALETTE)]
        pts = [px(a, b) for a, b in zip(np.asarray(x, float), tf(np.asarray(y, float))) if np.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        d.line([right + 10, top + 10 + 16 * k, right + 30, top + 10 + 16 * k], fill=colour, width=3)
        d.text((right + 36, top + 4 + 16 * k), name[:24], fill="black")
    return _save(img, path)


def _save(img: Image.Image, path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def table_html(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p><i>none</i></p>"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))  # every row's keys, in order
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:.4g}"
            cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """`sections` = [(heading, inner html)]; images are referenced relative to the report."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}th{background:#f0f0f0}img{max-width:100%;"
             "image-rendering:pixelated;border:1px solid #ddd;margin:4px 0}"
             "pre{background:#f6f6f6;padding:6px;white-space:pre-wrap}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, inner in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{inner}\n")
    parts.append("</body></html>\n")
    return atomic_write(path, "".join(parts))


def img_html(src: str, caption: str = "") -> str:
    cap = f"<div><small>{html.escape(caption)}</small></div>" if caption else ""
    return f"<figure><img src='{html.escape(src)}'>{cap}</figure>"
