"""Held-out evaluation of an image-like tokenizer: reconstruction quality and codebook usage.

Metrics by codec kind (computed in numpy on native arrays, i.e. exactly what `decode` returns):
  image    PSNR (dB, per image on the 0-255 scale, averaged over images)
  depth    AbsRel and RMSE (metres) over valid pixels (per image, averaged over images),
           delta < 1.25 accuracy, and how many invalid input pixels were masked
  normals  mean / median angular error (degrees, over all valid pixels), % within 11.25 degrees
  classes  pixel accuracy and mIoU (over classes present in target or prediction)
and for every tokenizer: codebook usage (% of codes used over the held-out set) and perplexity.
"""

from __future__ import annotations


import numpy as np

from fourm.io import atomic_write_json
from fourm.tokenizers.image import ImageTokenizer

# Targets of the quickstart (64 px, 8x8 tokens, scene data); `fourm-eval-tokenizer` marks them.
TARGETS = {
    "psnr": (">=", 28.0), "abs_rel": ("<=", 0.03), "angle_mean_deg": ("<=", 6.0),
    "pixel_acc": (">=", 0.97), "codebook_usage_pct": (">=", 90.0),
}


def image_metrics(x: np.ndarray, rec: np.ndarray) -> dict:
    err = (x.astype(np.float64) - rec.astype(np.float64)) / 255.0
    mse = np.mean(err ** 2, axis=tuple(range(1, x.ndim)))
    psnr = -10.0 * np.log10(np.maximum(mse, 1e-10))
    return {"psnr": float(psnr.mean()), "psnr_of_mean_mse": float(-10 * np.log10(max(mse.mean(), 1e-10)))}


def depth_metrics(x: np.ndarray, rec: np.ndarray) -> dict:
    x = x.astype(np.float64)
    rec = rec.astype(np.float64)
    valid = np.isfinite(x) & (x > 0)
    gt = np.where(valid, x, 1.0)
    n = np.maximum(valid.sum((1, 2)), 1)
    abs_rel = np.where(valid, np.abs(rec - gt) / gt, 0).sum((1, 2)) / n
    rmse = np.sqrt(np.where(valid, (rec - gt) ** 2, 0).sum((1, 2)) / n)
    ratio = np.maximum(rec / gt, gt / np.maximum(rec, 1e-9))
    delta1 = np.where(valid, ratio < 1.25, False).sum((1, 2)) / n
    has = valid.any((1, 2))
    return {"abs_rel": float(abs_rel[has].mean()) if has.any() else float("nan"),
            "rmse_m": float(rmse[has].mean()) if has.any() else float("nan"),
            "delta1": float(delta1[has].mean()) if has.any() else float("nan"),
            "invalid_pixels": int((~valid).sum())}


def normals_metrics(x: np.ndarray, rec: np.ndarray) -> dict:
    norm = np.linalg.norm(np.nan_to_num(x), axis=-1)
    valid = np.all(np.isfinite(x), -1) & (norm > 0.5)
    gt = np.nan_to_num(x) / np.maximum(norm, 1e-6)[..., None]
    cos = np.clip(np.sum(gt * rec, -1), -1.0, 1.0)
    ang = np.degrees(np.arccos(cos))[valid]
    return {"angle_mean_deg": float(ang.mean()), "angle_median_deg": float(np.median(ang)),
            "within_11.25_pct": float(100 * np.mean(ang < 11.25)),
            "invalid_pixels": int((~valid).sum())}


def classes_metrics(x: np.ndarray, rec: np.ndarray, num_classes: int) -> dict:
    valid = (x >= 0) & (x < num_classes)
    gt, pr = x[valid].astype(np.int64), rec[valid].astype(np.int64)
    conf = np.bincount(gt * num_classes + pr, minlength=num_classes ** 2).reshape(num_classes, -1)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"pixel_acc": float(tp.sum() / max(conf.sum(), 1)), "miou": float(iou.mean()),
            "iou_per_class": {int(c): float(v) for c, v in zip(np.nonzero(present)[0], iou)}}


def codebook_metrics(ids: np.ndarray, vocab_size: int) -> dict:
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codebook_usage_pct": float(100 * np.mean(counts > 0)),
            "codes_used": int((counts > 0).sum()), "vocab_size": int(vocab_size),
            "perplexity": float(np.exp(-np.sum(nz * np.log(nz)))), "tokens": int(ids.size)}


def evaluate(tok: ImageTokenizer, x: np.ndarray) -> dict:
    """Encode and decode the held-out batch `x` and compute the modality's metrics."""
    ids = tok.encode(x)
    rec = tok.decode(ids)
    kind = tok.codec.kind
    if kind == "image":
        m = image_metrics(x, rec)
    elif kind == "depth":
        m = depth_metrics(x, rec)
    elif kind == "normals":
        m = normals_metrics(x, rec)
    elif kind == "classes":
        m = classes_metrics(x, rec, tok.codec.num_classes)
    else:
        raise ValueError(f"no metrics for codec kind {kind!r}")
    m.update(codebook_metrics(ids, tok.vocab_size))
    m.update(name=tok.name, version=tok.version, step=tok.step, num_images=int(len(x)))
    return m


def format_report(m: dict) -> str:
    lines = [f"{m['name']}  step {m['step']}  ({m['num_images']} held-out images)  {m['version']}"]
    for k, v in m.items():
        if k in ("name", "version", "step", "num_images") or isinstance(v, dict):
            continue
        mark = ""
        if k in TARGETS:
            op, target = TARGETS[k]
            ok = v >= target if op == ">=" else v <= target
            mark = f"   target {op} {target}: {'PASS' if ok else 'MISS'}"
        lines.append(f"  {k:22s} {v:.4f}{mark}" if isinstance(v, float) else f"  {k:22s} {v}{mark}")
    return "\n".join(lines)


def write_report(m: dict, path) -> None:
    atomic_write_json(path, m)
