"""Reconstruction losses that fit each modality, on normalised model outputs (pure JAX).

Every loss takes the decoder output `y[B,H,W,C]`, the normalised target and a validity mask
`valid[B,H,W]` (invalid pixels - NaN/inf depth, zero normals - contribute nothing), and returns
`(scalar loss, metrics dict)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fourm.tokenizers.quantizers import l2_normalize


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `x[B,H,W]` over valid pixels (0 when nothing is valid)."""
    v = valid.astype(x.dtype)
    return jnp.sum(x * v) / jnp.maximum(jnp.sum(v), 1.0)


def image_loss(y, target, valid, *, l1_weight: float = 0.0, l2_weight: float = 1.0):
    """RGB (or any bounded continuous image in [-1, 1]): MSE, optionally plus L1."""
    err = y - target
    l2 = masked_mean(jnp.mean(err ** 2, -1), valid)
    l1 = masked_mean(jnp.mean(jnp.abs(err), -1), valid)
    # PSNR of the [-1, 1] range mapped to [0, 1]: MSE scales by 1/4.
    psnr = -10.0 * jnp.log10(jnp.maximum(l2 / 4.0, 1e-10))
    return l2_weight * l2 + l1_weight * l1, {"mse": l2, "l1": l1, "psnr": psnr}


def robust_standardize(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-image (x - median) / mean|x - median| over valid pixels (MiDaS-style, outlier-robust)."""
    xs = jnp.where(valid, x, jnp.nan)
    med = jnp.nanmedian(xs.reshape(x.shape[0], -1), axis=1)[:, None, None]
    med = jnp.where(jnp.isfinite(med), med, 0.0)
    dev = jnp.abs(x - med)
    scale = jnp.sum(jnp.where(valid, dev, 0.0), axis=(1, 2), keepdims=True) / jnp.maximum(
        jnp.sum(valid, axis=(1, 2), keepdims=True), 1)
    return (x - med) / jnp.maximum(scale, 1e-3)


def depth_loss(y, target, valid, *, ssi_weight: float = 0.5):
    """Depth in normalised log space: masked L1, plus an L1 between per-image robustly
    standardised prediction and target (the 4M-style robust normalisation, used as a loss term:
    it weights relative structure equally in near and far images). Tokens themselves use the
    fixed global log-depth normalisation so they decode back to metres."""
    y, target = y[..., 0], target[..., 0]
    l1 = masked_mean(jnp.abs(y - target), valid)
    ssi = masked_mean(jnp.abs(robust_standardize(y, valid) - robust_standardize(target, valid)), valid)
    return l1 + ssi_weight * ssi, {"l1_log": l1, "ssi": ssi}


def angular_error(pred_unit: jax.Array, target_unit: jax.Array) -> jax.Array:
    """Angle in radians between unit vectors; atan2 form has finite gradients where acos does not."""
    cross = jnp.cross(pred_unit, target_unit)
    dot = jnp.sum(pred_unit * target_unit, -1)
    return jnp.arctan2(jnp.sqrt(jnp.sum(cross * cross, -1) + 1e-12), dot)


def normals_loss(y, target, valid, *, l1_weight: float = 0.1):
    """Angular loss on unit-normalised outputs (+ a small L1 on the raw outputs, which keeps
    their norm near 1 so the normalisation is well conditioned)."""
    pred = l2_normalize(y)
    ang = masked_mean(angular_error(pred, target), valid)
    l1 = masked_mean(jnp.mean(jnp.abs(y - target), -1), valid)
    return ang + l1_weight * l1, {"angle_deg": jnp.degrees(ang), "l1": l1}


def classes_loss(logits, labels, valid, *, label_smoothing: float = 0.0):
    """Per-pixel softmax cross-entropy over classes; `labels` int [B,H,W]."""
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, k, dtype=logits.dtype)
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / k
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)
    acc = masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), valid)
    return masked_mean(ce, valid), {"ce": masked_mean(ce, valid), "pixel_acc": acc}
