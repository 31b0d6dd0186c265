"""4M's patched UNet (DiVAE's diffusion decoder) as a pure function over a params pytree.

    arch = unet_arch(cfg)                               # cfg: the tokenizer's config.json dict
    params = load_decoder_params(tensors, cfg)          # tensors: model.safetensors as numpy
    out = apply_unet(arch, params, x_t, t, quant)       # NCHW in, NCHW out, like the reference

The network is ml-4m's `PatchedUNetCondCat` (fourm/vq/models/unet/unet.py): the noisy image is
cut into P x P patches folded into channels, the quantized latent `quant` is nearest-upsampled to
that patch grid and concatenated, an ADM-style UNet (GroupNorm(32) ResBlocks with an additive
timestep embedding, QKV self-attention (one head by default) at the listed downsampling rates,
strided-conv down / nearest+conv up) runs on the patch grid, and the output is unfolded back to
pixels. DiVAE feeds `quant` straight in: no post-quant projection sits on this path.

Architecture names map to sizes in `UNET_ARCHS` (ml-4m defines only `unet_patched`);
`register_unet_arch` adds more, e.g. the fixtures' `unet_patched_tiny`. Internally activations
are NHWC (what XLA's convolutions want on every backend); the torch layouts are converted once at
load. Parameters are kept in float32 and every norm / softmax runs in float32, as the reference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fourm.model.pretrained import CheckpointError

PREFIX = "decoder."  # where DiVAE keeps its UNet in the state dict

# UNetModel defaults (ml-4m); an arch entry may override any of them.
UNET_DEFAULTS = dict(num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                     resblock_updown=False, use_new_attention_order=False, conv_resample=True, dims=2,
                     num_classes=None, dropout=0.0, use_checkpoint=False)
UNET_ARCHS: dict[str, dict[str, Any]] = {
    "unet_patched": dict(patch_size=4, model_channels=256, num_res_blocks=3, attention_resolutions=(4, 8),
                         channel_mult=(1, 2, 2, 2)),
}
_ARCH_KEYS = {"patch_size", "model_channels", "num_res_blocks", "attention_resolutions", "channel_mult",
              *UNET_DEFAULTS}
CONDITIONING = ("concat", "xattn")
GROUPS, GN_EPS = 32, 1e-5  # ml-4m's normalization(): GroupNorm32(32, ch), torch's default eps


# The tiny size the DiVAE fixture (../shared/fixtures/ml4m/tokenizers/divae_unet_rgb/README.md) registered
# in ml-4m before building its model; not part of ml-4m. Tests and check-tokenizer register it.
FIXTURE_UNETS = {"unet_patched_tiny": dict(patch_size=4, model_channels=32, num_res_blocks=1,
                                           attention_resolutions=(2,), channel_mult=(1, 2))}


def register_unet_arch(name: str, **kw) -> None:
    """Add a patched-UNet size under `name`, as ml-4m's `unet_patched(**kw)` builders do.

    Re-registering a name with the same size is a no-op; with another size it is an error.
    """
    unknown = sorted(set(kw) - _ARCH_KEYS)
    missing = sorted({"patch_size", "model_channels", "num_res_blocks", "attention_resolutions",
                      "channel_mult"} - set(kw))
    if unknown or missing:
        raise ValueError(f"UNet arch {name!r}: unknown keys {unknown}, missing keys {missing}")
    entry = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}
    if name in UNET_ARCHS and UNET_ARCHS[name] != entry:
        raise ValueError(f"UNet arch {name!r} is already registered as {UNET_ARCHS[name]}, not {entry}")
    UNET_ARCHS[name] = entry


def register_fixture_unets() -> None:
    for name, kw in FIXTURE_UNETS.items():
        register_unet_arch(name, **kw)


# ============================================================================ architecture plan
@dataclasses.dataclass(frozen=True)
class UNetArch:
    """Static description of one patched UNet: hashable, so it can be a jit static argument."""

    in_channels: int  # image channels (before patching)
    out_channels: int
    cond_channels: int  # latent_dim of the quantizer
    patch_size: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[float, ...]
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    conv_resample: bool = True

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels


def unet_arch(cfg: Mapping[str, Any]) -> UNetArch:
    """The UNet DiVAE builds from its config: in/out = n_channels, cond = latent_dim."""
    name = cfg.get("dec_type")
    if not isinstance(name, str) or name not in UNET_ARCHS:
        hint = " (UViT decoders are not supported)" if isinstance(name, str) and "uvit_" in name else ""
        raise ValueError(f"config dec_type: unknown UNet architecture {name!r}{hint}; "
                         f"known: {sorted(UNET_ARCHS)} (register_unet_arch adds one)")
    a = {**UNET_DEFAULTS, **UNET_ARCHS[name]}
    if a["dims"] != 2 or a["num_classes"] is not None:
        raise ValueError(f"UNet arch {name!r}: only dims=2 without class labels is supported "
                         f"(got dims={a['dims']}, num_classes={a['num_classes']})")
    # ml-4m's UNet always concatenates the upsampled latents; `conditioning` only steers its UViT
    # decoders ('concat' | 'xattn'), so a UNet DiVAE accepts either and ignores it, as the reference.
    if cfg.get("conditioning", "concat") not in CONDITIONING:
        raise ValueError(f"config conditioning: expected one of {list(CONDITIONING)}, got {cfg['conditioning']!r}")
    for key in ("n_channels", "latent_dim", "image_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise ValueError(f"config {key}: expected int, got {cfg.get(key, '<missing>')!r}")
    return UNetArch(in_channels=cfg["n_channels"], out_channels=cfg["n_channels"], cond_channels=cfg["latent_dim"],
                    **{k: a[k] for k in ("patch_size", "model_channels", "num_res_blocks", "num_heads",
                                         "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
                                         "resblock_updown", "use_new_attention_order", "conv_resample")},
                    attention_resolutions=tuple(a["attention_resolutions"]),
                    channel_mult=tuple(a["channel_mult"]))


# A layer of the plan: (kind, static fields). Kinds: conv, res, attn, down, up.
def _res(cin, cout, updown=None):
    return ("res", dict(cin=cin, cout=cout, updown=updown))


def _attn(ch, heads, head_channels):
    return ("attn", dict(ch=ch, heads=heads if head_channels == -1 else ch // head_channels))


def plan(arch: UNetArch) -> dict[str, Any]:
    """Blocks of the UNet in the reference's module order (input, middle, output), each a list of layers."""
    mc, heads_up = arch.model_channels, arch.num_heads_upsample
    heads_up = arch.num_heads if heads_up == -1 else heads_up
    cin_p = arch.in_channels * arch.patch_size ** 2 + arch.cond_channels
    ch = input_ch = int(arch.channel_mult[0] * mc)
    inputs = [[("conv", dict(cin=cin_p, cout=ch))]]
    chans, ds = [ch], 1
    for level, mult in enumerate(arch.channel_mult):
        for _ in range(arch.num_res_blocks):
            layers = [_res(ch, int(mult * mc))]
            ch = int(mult * mc)
            if ds in arch.attention_resolutions:
                layers.append(_attn(ch, arch.num_heads, arch.num_head_channels))
            inputs.append(layers)
            chans.append(ch)
        if level != len(arch.channel_mult) - 1:
            inputs.append([_res(ch, ch, "down") if arch.resblock_updown else ("down", dict(ch=ch))])
            chans.append(ch)
            ds *= 2
    middle = [_res(ch, ch), _attn(ch, arch.num_heads, arch.num_head_channels), _res(ch, ch)]
    outputs = []
    for level, mult in list(enumerate(arch.channel_mult))[::-1]:
        for i in range(arch.num_res_blocks + 1):
            layers = [_res(ch + chans.pop(), int(mc * mult))]
            ch = int(mc * mult)
            if ds in arch.attention_resolutions:
                layers.append(_attn(ch, heads_up, arch.num_head_channels))
            if level and i == arch.num_res_blocks:
                layers.append(_res(ch, ch, "up") if arch.resblock_updown else ("up", dict(ch=ch)))
                ds //= 2
            outputs.append(layers)
    return dict(input_blocks=inputs, middle_block=middle, output_blocks=outputs, out_ch=ch, input_ch=input_ch)


# ============================================================================ tensor layout
def _expected(arch: UNetArch) -> dict[str, tuple[int, ...]]:
    """torch state-dict name (without 'decoder.') -> shape, for every tensor the UNet owns."""
    p, shapes = plan(arch), {}
    mc, emb = arch.model_channels, arch.emb_dim

    def lin(name, cin, cout):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin), (cout,)

    def conv(name, cin, cout, k=3, nd=2):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin) + (k,) * nd, (cout,)

    def norm(name, ch):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (ch,)

    def layer(name, kind, f):
        if kind == "conv":
            conv(name, f["cin"], f["cout"])
        elif kind == "res":
            norm(f"{name}.in_layers.0", f["cin"])
            conv(f"{name}.in_layers.2", f["cin"], f["cout"])
            lin(f"{name}.emb_layers.1", emb, 2 * f["cout"] if arch.use_scale_shift_norm else f["cout"])
            norm(f"{name}.out_layers.0", f["cout"])
            conv(f"{name}.out_layers.3", f["cout"], f["cout"])
            if f["cin"] != f["cout"]:
                conv(f"{name}.skip_connection", f["cin"], f["cout"], k=1)
        elif kind == "attn":
            norm(f"{name}.norm", f["ch"])
            conv(f"{name}.qkv", f["ch"], 3 * f["ch"], k=1, nd=1)
            conv(f"{name}.proj_out", f["ch"], f["ch"], k=1, nd=1)
        elif kind in ("down", "up") and arch.conv_resample:
            conv(f"{name}.{'op' if kind == 'down' else 'conv'}", f["ch"], f["ch"])

    lin("time_embed.0", mc, emb)
    lin("time_embed.2", emb, emb)
    for group in ("input_blocks", "output_blocks"):
        for i, layers in enumerate(p[group]):
            for j, (kind, f) in enumerate(layers):
                layer(f"{group}.{i}.{j}", kind, f)
    for j, (kind, f) in enumerate(p["middle_block"]):
        layer(f"middle_block.{j}", kind, f)
    norm("out.0", p["out_ch"])
    conv("out.2", p["input_ch"], arch.out_channels * arch.patch_size ** 2)
    return shapes


def _to_jax_layout(w: np.ndarray) -> np.ndarray:
    """torch -> ours: Conv2d OIHW -> HWIO, Conv1d (O, I, 1) and Linear (O, I) -> (I, O)."""
    if w.ndim == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if w.ndim == 3:
        return np.transpose(w[:, :, 0])
    if w.ndim == 2:
        return np.transpose(w)
    return w


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    """'input_blocks.3.1.qkv.weight' -> params['input_blocks']['3']['1']['qkv']['weight']."""
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *path, leaf = name.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = jnp.asarray(_to_jax_layout(np.asarray(v, np.float32)))
    return tree


def load_decoder_params(tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> dict:
    """The UNet's params pytree from a DiVAE state dict (all of model.safetensors; only 'decoder.*' is read).

    Raises CheckpointError naming every missing, unexpected or misshapen decoder tensor.
    """
    want = _expected(unet_arch(cfg))
    have = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    missing = sorted(PREFIX + k for k in set(want) - set(have))
    unexpected = sorted(PREFIX + k for k in set(have) - set(want))
    wrong = [f"{PREFIX}{k}: expected {want[k]}, got {tuple(np.shape(have[k]))}"
             for k in sorted(set(want) & set(have)) if tuple(np.shape(have[k])) != want[k]]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"wrong shape {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise CheckpointError(f"DiVAE decoder ({cfg.get('dec_type')}) weights do not fit: " + " | ".join(problems))
    return _nest(have)


def random_decoder_params(cfg: Mapping[str, Any], seed: int = 0) -> dict:
    """Random params of the right shapes (benchmarks: speed does not depend on what the weights learned)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in _expected(unet_arch(cfg)).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        flat[name] = (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in) if len(shape) > 1
                      else np.ones(shape, np.float32) if name.endswith("weight") else np.zeros(shape, np.float32))
    return _nest(flat)


# ============================================================================ forward
def _conv(p, x, stride=1):
    k = p["weight"].shape[0]
    pad = (k - 1) // 2
    y = jax.lax.conv_general_dilated(x, p["weight"], (stride, stride), ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"]


def _dense(p, x):
    return x @ p["weight"] + p["bias"]


def _group_norm(p, x):
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, GROUPS, c // GROUPS)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + GN_EPS)
    return g.reshape(b, h, w, c) * p["weight"] + p["bias"]


def _up2(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_down2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _resample(kind: str, p, x, conv: bool):
    if kind == "down":
        return _conv(p["op"], x, stride=2) if conv else _avg_down2(x)
    x = _up2(x)
    return _conv(p["conv"], x) if conv else x


def _resblock(arch: UNetArch, f, p, x, emb):
    h = jax.nn.silu(_group_norm(p["in_layers"]["0"], x))
    if f["updown"]:  # resblock_updown: resample between the norm and the conv, on both paths
        h, x = _resample(f["updown"], None, h, False), _resample(f["updown"], None, x, False)
    h = _conv(p["in_layers"]["2"], h)
    e = _dense(p["emb_layers"]["1"], jax.nn.silu(emb))[:, None, None, :]
    if arch.use_scale_shift_norm:
        scale, shift = jnp.split(e, 2, axis=-1)
        h = _group_norm(p["out_layers"]["0"], h) * (1 + scale) + shift
    else:
        h = _group_norm(p["out_layers"]["0"], h + e)
    h = _conv(p["out_layers"]["3"], jax.nn.silu(h))  # dropout: identity at inference
    skip = _conv(p["skip_connection"], x) if "skip_connection" in p else x
    return skip + h


def _attention(arch: UNetArch, f, p, x):
    b, hh, ww, c = x.shape
    heads = f["heads"]
    ch = c // heads
    t = _group_norm(p["norm"], x).reshape(b, hh * ww, c)
    qkv = _dense(p["qkv"], t)
    # The legacy order (default) lays the qkv channels out head by head ([q k v] per head);
    # the new order lays out all q, then all k, then all v.
    if arch.use_new_attention_order:
        q, k, v = jnp.moveaxis(qkv.reshape(b, hh * ww, 3, heads, ch), 2, 0)
    else:
        q, k, v = jnp.moveaxis(qkv.reshape(b, hh * ww, heads, 3, ch), 3, 0)
    logits = jnp.einsum("bthc,bshc->bhts", q, k) / math.sqrt(ch)
    a = jnp.einsum("bhts,bshc->bthc", jax.nn.softmax(logits.astype(jnp.float32), axis=-1), v)
    return x + _dense(p["proj_out"], a.reshape(b, hh * ww, c)).reshape(b, hh, ww, c)


def _layer(arch, kind, f, p, x, emb):
    if kind == "conv":
        return _conv(p, x)
    if kind == "res":
        return _resblock(arch, f, p, x, emb)
    if kind == "attn":
        return _attention(arch, f, p, x)
    return _resample(kind, p, x, arch.conv_resample)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, cos first (ADM); frequencies computed in float32 like the reference."""
    half = dim // 2
    freqs = np.exp(np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))
    args = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch F.interpolate(mode='nearest') source indices: floor(i * (in/out) in float32), clamped."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in / n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def _sub(params: Mapping, *path) -> Mapping:
    """params of one layer; layers without weights (avg-pool / nearest resampling) have no entry."""
    for k in path:
        params = params.get(str(k), {})
    return params


def apply_unet(arch: UNetArch, params: Mapping, sample: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
    """One evaluation: sample (B, C, H, W) at timestep t (scalar or (B,)), cond = quant (B, D, h, w) -> NCHW.

    A scalar t gives one embedding shared by the batch, as the reference pipeline passes a 0-d tensor.
    """
    b, c, h, w = sample.shape
    ps = arch.patch_size
    if h % ps or w % ps:
        raise ValueError(f"image size {h}x{w} must be divisible by the UNet patch size {ps}")
    nh, nw = h // ps, w // ps
    # Patchify NCHW -> NHWC with channels ordered (c, ph, pw), as the reference's rearrange.
    x = sample.reshape(b, c, nh, ps, nw, ps).transpose(0, 2, 4, 1, 3, 5).reshape(b, nh, nw, c * ps * ps)
    cond = jnp.transpose(cond, (0, 2, 3, 1))
    cond = cond[:, _nearest_index(cond.shape[1], nh)][:, :, _nearest_index(cond.shape[2], nw)]
    x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)

    te = params["time_embed"]
    emb = _dense(te["2"], jax.nn.silu(_dense(te["0"], timestep_embedding(t, arch.model_channels))))
    pl, skips = plan(arch), []
    for i, layers in enumerate(pl["input_blocks"]):
        for j, (kind, f) in enumerate(layers):
            x = _layer(arch, kind, f, _sub(params, "input_blocks", i, j), x, emb)
        skips.append(x)
    for j, (kind, f) in enumerate(pl["middle_block"]):
        x = _layer(arch, kind, f, _sub(params, "middle_block", j), x, emb)
    for i, layers in enumerate(pl["output_blocks"]):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        for j, (kind, f) in enumerate(layers):
            x = _layer(arch, kind, f, _sub(params, "output_blocks", i, j), x, emb)
    x = _conv(params["out"]["2"], jax.nn.silu(_group_norm(params["out"]["0"], x)))
    # Unpatchify NHWC (c, ph, pw) -> NCHW.
    co = arch.out_channels
    return x.reshape(b, nh, nw, co, ps, ps).transpose(0, 3, 1, 4, 2, 5).reshape(b, co, h, w)
