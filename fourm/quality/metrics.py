"""Per-task metrics on held-out scenes, as pure numpy functions of (prediction, truth).

Dense tasks: depth AbsRel (mean |d - d*| / d*) and RMSE (metres), normals mean angle (degrees),
segmentation mIoU (over the classes present in the truth or the prediction, from one confusion
matrix over all scenes) and pixel accuracy. Captions are reduced to the facts the scene grammar
states (object count, colours, shapes: `CaptionFacts`), so a generated caption and a specialist's
predicted facts are scored by the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fourm.data import scenes as scenes_lib
from fourm.quality import captions as cap


def abs_rel(pred, true) -> np.ndarray:
    """Per-image mean absolute relative depth error [B]."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    return (np.abs(pred - true) / np.maximum(true, 1e-6)).reshape(len(true), -1).mean(-1)


def squared_error(pred, true) -> np.ndarray:
    """Per-image mean squared error [B] (average these, then take the root, for an RMSE)."""
    d = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    return (d * d).reshape(len(d), -1).mean(-1)


def angular_error_deg(pred, true) -> np.ndarray:
    """Angle between normal vectors (last axis), degrees, elementwise."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(true, np.float64)
    p = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-8)
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
    return np.degrees(np.arccos(np.clip((p * t).sum(-1), -1.0, 1.0)))


def mean_angle_deg(pred, true) -> np.ndarray:
    """Per-image mean angular error [B]."""
    a = angular_error_deg(pred, true)
    return a.reshape(len(a), -1).mean(-1)


def confusion(pred, true, num_classes: int = scenes_lib.NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """[C, C] pixel counts, rows = true class, columns = predicted (out-of-range predictions are
    dropped from the columns but still count as wrong pixels through the row sums)."""
    p = np.asarray(pred).astype(np.int64).ravel()
    t = np.asarray(true).astype(np.int64).ravel()
    ok = (p >= 0) & (p < num_classes)
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (t[ok], p[ok]), 1)
    rows = np.bincount(t, minlength=num_classes)[:num_classes]
    return m, rows


def segmentation_scores(conf: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """mIoU over classes seen in truth or prediction, and pixel accuracy."""
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = rows - tp
    union = tp + fp + fn
    seen = union > 0
    return {"miou": float((tp[seen] / union[seen]).mean()) if seen.any() else float("nan"),
            "pixel_acc": float(tp.sum() / max(rows.sum(), 1))}


def semseg_scores(pred, true, num_classes: int = scenes_lib.NUM_CLASSES) -> dict[str, float]:
    return segmentation_scores(*confusion(pred, true, num_classes))


@dataclasses.dataclass(frozen=True)
class CaptionFacts:
    count: int | None
    colours: frozenset
    shapes: frozenset

    @classmethod
    def of_text(cls, text: str) -> "CaptionFacts":
        return cls(cap.parse_count(text), frozenset(cap.parse_colours(text)),
                   frozenset(cap.parse_shapes(text)))

    @classmethod
    def of_scene(cls, scene: dict) -> "CaptionFacts":
        """The truth: the scene's visible objects (what its caption is made from)."""
        boxes = scene["boxes"]
        return cls(len(boxes), frozenset(b["colour"] for b in boxes), frozenset(b["class"] for b in boxes))


def _pr(got: frozenset, true: frozenset) -> tuple[float, float]:
    hit = len(got & true)
    return (hit / len(got) if got else (1.0 if not true else 0.0)), (hit / len(true) if true else 1.0)


def caption_scores(preds: Sequence[CaptionFacts], scenes: Sequence[dict]) -> dict[str, float]:
    """count_acc; colour / shape precision and recall, averaged over scenes. A caption that names
    no colour has precision 0 unless the scene has none: saying nothing is not being precise."""
    if len(preds) != len(scenes) or not scenes:
        raise ValueError(f"caption_scores: {len(preds)} predictions for {len(scenes)} scenes")
    out = {"count_acc": float(np.mean([p.count == len(s["boxes"]) for p, s in zip(preds, scenes)]))}
    for key in ("colours", "shapes"):
        pr = [_pr(getattr(p, key), getattr(CaptionFacts.of_scene(s), key)) for p, s in zip(preds, scenes)]
        name = key[:-1]
        out[f"{name}_precision"] = float(np.mean([a for a, _ in pr]))
        out[f"{name}_recall"] = float(np.mean([b for _, b in pr]))
    return out
