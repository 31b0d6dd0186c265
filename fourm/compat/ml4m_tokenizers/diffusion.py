"""DiVAE decoding: 4M's DDIM / DDPM schedulers and the sampling loop, jitted once per shape.

    ts = scheduler_timesteps(cfg, 25, "trailing")                  # ml-4m's set_timesteps
    x_T = initial_noise(jax.random.key(0), cfg, batch=1)           # or the reference's recorded noise
    images = decode(params, quant, noise=x_T, timesteps=ts, cfg=cfg)   # (B, C, H, W) in [-1, 1]-ish

Mirrors ml-4m's fourm/vq/scheduling (DDIMScheduler, DDPMScheduler, PipelineCond) as DiVAE builds
them from its config: `scheduler` ('ddim' | 'ddpm'), `beta_schedule` ('linear', 'scaled_linear',
'squaredcos_cap_v2', 'shifted_cosine:<shift>', and for DDPM 'sigmoid'), `zero_terminal_snr`,
`prediction_type` ('sample' | 'epsilon' | 'v_prediction'), `thresholding` (Imagen's dynamic
thresholding of the predicted x0) or else `clip_sample`. Constructor arguments DiVAE does not pass
keep the reference defaults (beta 1e-4..0.02, set_alpha_to_one, steps_offset 0, ratio 0.995,
sample_max_value 1, clip range 1, DDPM variance 'fixed_small').

The schedule tables are computed in float32 numpy step by step as torch does (torch.linspace's
two-sided formula included), so alphas_cumprod matches the reference's values. The whole
denoising loop is one `lax.scan` over the timesteps array inside one jit: a new timesteps
*value* of the same length reuses the compiled program. Randomness is explicit: `noise` is x_T;
DDPM's per-step noise (and DDIM's when eta > 0) comes from `key` (torch's generator stream cannot be
reproduced, so a DDPM decode matches the reference in distribution, not bitwise).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fourm.compat.ml4m_tokenizers.unet import UNetArch, apply_unet, unet_arch

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
SCHEDULERS = ("ddim", "ddpm")
TIMESTEP_MODES = ("leading", "trailing", "linspace")
TRACES: collections.Counter = collections.Counter()  # compilations of the sampling loop, per scheduler


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    kind: str  # 'ddim' | 'ddpm'
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    zero_terminal_snr: bool = True
    prediction_type: str = "sample"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # DDIM: alpha_prev of the last step
    steps_offset: int = 0  # DDIM


def _req(cfg: Mapping[str, Any], key: str, kind: type, allowed=None):
    if key not in cfg:
        raise ValueError(f"config: missing key {key!r}")
    v = cfg[key]
    # bool is an int in Python: keep true/false out of int fields and 0/1 out of bool fields.
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"config {key}: expected {kind.__name__}, got {v!r}")
    if allowed is not None and v not in allowed:
        raise ValueError(f"config {key}: expected one of {list(allowed)}, got {v!r}")
    return v


def scheduler_spec(cfg: Mapping[str, Any]) -> SchedulerSpec:
    """The scheduler DiVAE builds from its config.json (the reference's noise_scheduler)."""
    kind = _req(cfg, "scheduler", str, SCHEDULERS)
    spec = SchedulerSpec(
        kind=kind, num_train_timesteps=_req(cfg, "num_train_timesteps", int),
        beta_schedule=_req(cfg, "beta_schedule", str), zero_terminal_snr=_req(cfg, "zero_terminal_snr", bool),
        prediction_type=_req(cfg, "prediction_type", str, PREDICTION_TYPES),
        thresholding=_req(cfg, "thresholding", bool), clip_sample=_req(cfg, "clip_sample", bool))
    alphas_cumprod(spec)  # validates beta_schedule by name
    return spec


# ============================================================================ schedules
def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32): float32 step, filled from both ends."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(n - 1)
    i = np.arange(n, dtype=np.float32)
    lo = start32 + step * i
    hi = end32 - step * (np.float32(n - 1) - i)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def _torch_cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 CPU tensor: the running product is kept in float64, each entry rounded."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _glide_cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale so sqrt(alphas_cumprod) ends at 0 and keeps its first value (arXiv 2305.08891), in float32."""
    abar_sqrt = np.sqrt(_torch_cumprod_f32(np.float32(1) - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def _shifted_cosine_alphas_cumprod(n: int, shift: float) -> np.ndarray:
    """Cosine schedule shifted by log(shift) in log-SNR (arXiv 2305.18231); the last value is 0."""
    t = np.linspace(0, 1, n, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_snr = -2 * (np.log(np.tan(np.pi * t / 2)) + np.log(shift))
    log_snr = np.clip(log_snr, -15, 15).astype(np.float32)
    out = (np.float32(1) / (np.float32(1) + np.exp(-log_snr))).astype(np.float32)
    out[-1] = 0.0
    return out


def alphas_cumprod(spec: SchedulerSpec) -> np.ndarray:
    """float32 alphas_cumprod[0..num_train_timesteps-1] of the reference scheduler."""
    n, name = spec.num_train_timesteps, spec.beta_schedule
    if name.startswith("shifted_cosine:"):
        try:
            shift = float(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"config beta_schedule: {name!r} is not 'shifted_cosine:<float>'") from None
        return _shifted_cosine_alphas_cumprod(n, shift)
    if name == "linear":
        betas = _torch_linspace_f32(spec.beta_start, spec.beta_end, n)
    elif name == "scaled_linear":
        betas = _torch_linspace_f32(spec.beta_start ** 0.5, spec.beta_end ** 0.5, n) ** 2
    elif name == "squaredcos_cap_v2":
        betas = _glide_cosine_betas(n)
    elif name == "sigmoid" and spec.kind == "ddpm":  # the reference's DDIM does not have it
        s = _torch_linspace_f32(-6, 6, n)
        betas = (np.float32(1) / (np.float32(1) + np.exp(-s))) * np.float32(spec.beta_end - spec.beta_start) \
            + np.float32(spec.beta_start)
    else:
        known = ["linear", "scaled_linear", "squaredcos_cap_v2", "shifted_cosine:<shift>"] + \
            (["sigmoid"] if spec.kind == "ddpm" else [])
        raise ValueError(f"config beta_schedule: {name!r} is not supported by the {spec.kind} scheduler; "
                         f"expected one of {known}")
    betas = betas.astype(np.float32)
    if spec.zero_terminal_snr:
        betas = _zero_terminal_snr(betas)
    return _torch_cumprod_f32(np.float32(1) - betas)


@functools.lru_cache(maxsize=16)
def _alphas_cumprod_cached(spec: SchedulerSpec) -> np.ndarray:
    """Per-call decode does not rebuild the table (squaredcos is a Python loop over 1000 steps)."""
    out = alphas_cumprod(spec)
    out.flags.writeable = False
    return out


def scheduler_timesteps(cfg: Mapping[str, Any], num_steps: int | None = None, mode: str = "trailing") -> np.ndarray:
    """The reference's scheduler.timesteps after set_timesteps(num_steps, mode) (int64, descending).

    num_steps None = num_train_timesteps (the pipeline's default). DDPM ignores `mode` (its
    set_timesteps always spaces 'leading'), exactly as the reference does. With 'trailing' and a
    step count that does not divide num_train_timesteps, the array can hold one more entry than
    num_steps (numpy arange semantics, as the reference); pass num_steps to `decode` then.
    """
    spec = cfg if isinstance(cfg, SchedulerSpec) else scheduler_spec(cfg)
    n = spec.num_train_timesteps
    num_steps = n if num_steps is None else int(num_steps)
    if not 1 <= num_steps <= n:
        raise ValueError(f"number of decoding steps: expected 1..{n} (num_train_timesteps), got {num_steps}")
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"scheduler_timesteps_mode: expected one of {list(TIMESTEP_MODES)}, got {mode!r}")
    ratio = n // num_steps
    if spec.kind == "ddpm" or mode == "leading":
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64)
    elif mode == "trailing":
        ts = np.arange(n, 0, -ratio).round().astype(np.int64) - 1
    else:
        ts = np.linspace(n, 1, num_steps).round().astype(np.int64) - 1
    return ts + (spec.steps_offset if spec.kind == "ddim" else 0)


# ============================================================================ one step
def _threshold(spec: SchedulerSpec, x0: jax.Array) -> jax.Array:
    """Dynamic thresholding: s = clamp(quantile(|x0|, ratio), 1, max) per image; x0 -> clamp(x0, +-s) / s."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    if spec.sample_max_value <= 1.0:
        # clamp(min=1) then clamp(max<=1) always yields sample_max_value: skip the per-step sort.
        s = jnp.full((b, 1), spec.sample_max_value, flat.dtype)
    else:
        q = jnp.quantile(jnp.abs(flat), spec.dynamic_thresholding_ratio, axis=1, method="linear")
        s = jnp.minimum(jnp.maximum(q, 1.0), spec.sample_max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def _predict_x0_eps(spec: SchedulerSpec, out, x, a_t):
    beta_t = 1 - a_t
    if spec.prediction_type == "epsilon":
        return (x - jnp.sqrt(beta_t) * out) / jnp.sqrt(a_t), out
    if spec.prediction_type == "sample":
        return out, (x - jnp.sqrt(a_t) * out) / jnp.sqrt(beta_t)
    return jnp.sqrt(a_t) * x - jnp.sqrt(beta_t) * out, jnp.sqrt(a_t) * out + jnp.sqrt(beta_t) * x


def _clip_x0(spec: SchedulerSpec, x0):
    if spec.thresholding:
        return _threshold(spec, x0)
    if spec.clip_sample:
        return jnp.clip(x0, -spec.clip_sample_range, spec.clip_sample_range)
    return x0


def ddim_step(spec: SchedulerSpec, acp: jax.Array, out, t, x, prev_offset: int, eta: float = 0.0, noise=None):
    """x_t -> x_{t-prev_offset} (DDIM, arXiv 2010.02502 eq. 12/16); eta > 0 needs `noise`."""
    prev = t - prev_offset
    final = jnp.float32(1.0) if spec.set_alpha_to_one else acp[0]
    a_t = acp[t]
    a_prev = jnp.where(prev >= 0, acp[jnp.maximum(prev, 0)], final)
    x0, eps = _predict_x0_eps(spec, out, x, a_t)
    x0 = _clip_x0(spec, x0)
    if eta > 0:
        std = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    else:
        std = jnp.float32(0.0)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
    if eta > 0:
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(spec: SchedulerSpec, acp: jax.Array, out, t, x, prev_offset: int, noise):
    """Ancestral step x_t -> x_{t-prev_offset} (posterior mean + 'fixed_small' std * noise; none at t = 0)."""
    prev = t - prev_offset
    a_t = acp[t]
    a_prev = jnp.where(prev >= 0, acp[jnp.maximum(prev, 0)], jnp.float32(1.0))
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0, _ = _predict_x0_eps(spec, out, x, a_t)
    x0 = _clip_x0(spec, x0)
    mean = (jnp.sqrt(a_prev) * cur_beta / beta_t) * x0 + (jnp.sqrt(cur_alpha) * beta_prev / beta_t) * x
    var = jnp.maximum(beta_prev / beta_t * cur_beta, 1e-20)
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise


# ============================================================================ the loop
@functools.partial(jax.jit, static_argnames=("arch", "spec", "prev_offset", "eta"))
def _sample(params, quant, noise, timesteps, acp, key, step_noise, *, arch: UNetArch, spec: SchedulerSpec,
            prev_offset: int, eta: float):
    TRACES[spec.kind] += 1  # runs only while tracing: counts compilations

    def body(x, inp):
        i, t, given = inp
        out = apply_unet(arch, params, x, t, quant).astype(jnp.float32)
        if step_noise is not None:
            z = given
        elif spec.kind == "ddpm" or eta > 0:
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        else:
            z = None
        if spec.kind == "ddpm":
            return ddpm_step(spec, acp, out, t, x, prev_offset, z), None
        return ddim_step(spec, acp, out, t, x, prev_offset, eta, z), None

    steps = jnp.arange(timesteps.shape[0])
    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), (steps, timesteps, step_noise))
    return x


def initial_noise(key: jax.Array, cfg: Mapping[str, Any], batch: int, image_size: int | None = None) -> jax.Array:
    """x_T ~ N(0, 1) of shape (batch, n_channels, S, S); S defaults to the decoder's size, as the pipeline."""
    s = image_size or cfg.get("image_size_dec") or cfg["image_size"]
    return jax.random.normal(key, (batch, int(cfg["n_channels"]), int(s), int(s)), jnp.float32)


def decode(params: Mapping, quant, *, noise, timesteps, cfg: Mapping[str, Any], key: jax.Array | None = None,
           num_inference_steps: int | None = None, eta: float = 0.0, step_noise=None) -> jax.Array:
    """DiVAE.decode_quant: denoise `noise` (x_T, (B, C, H, W)) conditioned on `quant` ((B, latent_dim, h, w)).

    timesteps: the int array the reference's scheduler steps through (scheduler_timesteps);
    num_inference_steps: what set_timesteps was called with (sets the step to the previous
    timestep, num_train_timesteps // num_inference_steps); default len(timesteps).
    key: the randomness of DDPM's ancestral steps and of DDIM with eta > 0 (required there);
    step_noise: instead of `key`, that noise given, (len(timesteps), B, C, H, W) (entry i is used at
    step i; DDPM ignores the entry of t = 0) - to replay a reference run that recorded its draws.
    Returns float32 images (B, C, H, W), unclipped, like the reference.
    """
    arch, spec = unet_arch(cfg), scheduler_spec(cfg)
    quant, noise = jnp.asarray(quant), jnp.asarray(noise)
    ts = np.asarray(timesteps) if not isinstance(timesteps, jax.Array) else timesteps
    if ts.ndim != 1 or ts.shape[0] == 0 or not jnp.issubdtype(ts.dtype, jnp.integer):
        raise ValueError(f"timesteps: expected a non-empty 1-D integer array, got shape {ts.shape} {ts.dtype}")
    if isinstance(ts, np.ndarray) and (ts.min() < 0 or ts.max() >= spec.num_train_timesteps):
        raise ValueError(f"timesteps: values must lie in [0, {spec.num_train_timesteps}), "
                         f"got {ts.min()}..{ts.max()}")
    if quant.ndim != 4 or quant.shape[1] != arch.cond_channels:
        raise ValueError(f"quant: expected (B, {arch.cond_channels}, h, w) (latent_dim), got {quant.shape}")
    if noise.ndim != 4 or noise.shape[:2] != (quant.shape[0], arch.in_channels):
        raise ValueError(f"noise: expected ({quant.shape[0]}, {arch.in_channels}, H, W) "
                         f"(batch of quant, n_channels), got {noise.shape}")
    if noise.shape[2] % arch.patch_size or noise.shape[3] % arch.patch_size:
        raise ValueError(f"noise: image size {noise.shape[2]}x{noise.shape[3]} must be divisible by the "
                         f"UNet patch size {arch.patch_size}")
    needs_key = spec.kind == "ddpm" or eta > 0
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise, jnp.float32)
        if step_noise.shape != (ts.shape[0], *noise.shape):
            raise ValueError(f"step_noise: expected {(ts.shape[0], *noise.shape)} (steps, *noise.shape), "
                             f"got {step_noise.shape}")
    elif needs_key and key is None:
        raise ValueError(f"decode: the {spec.kind} scheduler{' with eta > 0' if eta > 0 else ''} draws noise "
                         "at every step; pass key=jax.random.key(...) or step_noise")
    steps = int(num_inference_steps or ts.shape[0])
    if not 1 <= steps <= spec.num_train_timesteps:
        raise ValueError(f"num_inference_steps: expected 1..{spec.num_train_timesteps}, got {steps}")
    key = key if key is not None else jax.random.key(0)  # unused when not needed
    return _sample(params, quant, noise, jnp.asarray(ts, jnp.int32), _alphas_cumprod_cached(spec), key,
                   step_noise, arch=arch, spec=spec, prev_offset=spec.num_train_timesteps // steps, eta=float(eta))


def decode_quant(params: Mapping, quant, cfg: Mapping[str, Any], *, key: jax.Array, steps: int | None = None,
                 mode: str = "trailing", image_size: int | None = None) -> jax.Array:
    """DiVAE.decode_quant(quant, timesteps=steps, scheduler_timesteps_mode=mode, image_size=...) with a JAX key.

    x_T and (DDPM) the per-step noise come from `key`; steps None = num_train_timesteps, as the reference.
    """
    k_init, k_steps = jax.random.split(key)
    noise = initial_noise(k_init, cfg, int(np.shape(quant)[0]), image_size)
    return decode(params, quant, noise=noise, timesteps=scheduler_timesteps(cfg, steps, mode), cfg=cfg,
                  key=k_steps, num_inference_steps=steps)
