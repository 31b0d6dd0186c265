"""4M's ViT tokenizer encoder / decoder (fourm/vq/models/vit_models.py) as pure functions.

Parameters are a nested dict converted once from the torch state dict (`load.py`): Linear weights
as (in, out), the patch-projection conv as a (C*P*P, D) matrix in (c, ph, pw) order, the stored
position embedding as (D, nh, nw). Activations are (B, tokens, D) inside, NCHW at the edges as in
the reference. The stored position embedding is bicubically resized to the input's token grid
exactly as torch's `F.interpolate(mode='bicubic', align_corners=False)` does (a fixed matrix per
axis), so inputs at another resolution than the trained one behave as in 4M.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fourm.compat.ml4m_tokenizers.config import ViTArch

VIT_LN_EPS = 1e-6  # 4M's ViT presets: partial(nn.LayerNorm, eps=1e-6)
_CUBIC_A = -0.75  # torch's bicubic kernel constant


def layer_norm(x, p, eps):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["w"] + p["b"]


def linear(x, p):
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() is the erf form


# ---------------------------------------------------------------------------------------------
# position embedding resize (torch bicubic, align_corners=False)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix M with resized = M @ original along one axis, replicating
    torch's upsample_bicubic2d: source x = (dst + 0.5) * n_in / n_out - 0.5, Keys kernel with
    A = -0.75, out-of-range taps clamped to the border."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    m = np.zeros((n_out, n_in), np.float64)
    scale = np.float32(n_in) / np.float32(n_out)
    for dst in range(n_out):
        real = float(np.float32(scale * np.float32(dst + 0.5) - np.float32(0.5)))
        i0 = int(np.floor(real))
        t = real - i0
        a = _CUBIC_A

        def c1(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def c2(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        for k, w in zip(range(i0 - 1, i0 + 3), (c2(t + 1), c1(t), c1(1 - t), c2(2 - t))):
            m[dst, min(max(k, 0), n_in - 1)] += w
    return m.astype(np.float32)


def pos_table(pos_emb, nh: int, nw: int):
    """Stored (D, h, w) embedding -> (nh * nw, D) for an nh x nw token grid."""
    d, h, w = pos_emb.shape
    if (h, w) != (nh, nw):
        pos_emb = jnp.einsum("oh,dhw,pw->dop", bicubic_matrix(h, nh), pos_emb, bicubic_matrix(w, nw),
                             precision=jax.lax.Precision.HIGHEST)
    return pos_emb.reshape(d, nh * nw).T


# ---------------------------------------------------------------------------------------------
# transformer
# ---------------------------------------------------------------------------------------------


def attention(x, p, num_heads: int):
    b, n, d = x.shape
    qkv = linear(x, p["qkv"]).reshape(b, n, 3, num_heads, d // num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       scale=(d // num_heads) ** -0.5)
    return linear(out.reshape(b, n, d), p["proj"])


def mlp(x, p, act=gelu):
    return linear(act(linear(x, p["fc1"])), p["fc2"])


def block(x, p, num_heads: int):
    x = x + attention(layer_norm(x, p["norm1"], VIT_LN_EPS), p["attn"], num_heads)
    return x + mlp(layer_norm(x, p["norm2"], VIT_LN_EPS), p["mlp"])


def _trunk(t, p, arch: ViTArch, post_mlp: bool):
    for bp in p["blocks"]:
        t = block(t, bp, arch.num_heads)
    if post_mlp:  # ViT-VQGAN's extra point-wise MLP (tanh) before the quantizer / after the decoder
        t = t + mlp(layer_norm(t, p["norm_mlp"], VIT_LN_EPS), p["post_mlp"], act=jnp.tanh)
    return t


def vit_encoder(p, x, arch: ViTArch, patch_size: int, patch_proj: bool, post_mlp: bool):
    """(B, C, H, W) image (or (B, C, nh, nw) feature map without patch_proj) -> (B, D, nh, nw)."""
    b, c, h, w = x.shape
    if patch_proj:
        ps = patch_size
        nh, nw = h // ps, w // ps
        t = x.reshape(b, c, nh, ps, nw, ps).transpose(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, c * ps * ps)
    else:  # 1x1 conv over a feature map
        nh, nw = h, w
        t = x.transpose(0, 2, 3, 1).reshape(b, h * w, c)
    t = linear(t, p["proj"]) + pos_table(p["pos_emb"], nh, nw)
    t = _trunk(t, p, arch, post_mlp)
    return t.reshape(b, nh, nw, arch.dim).transpose(0, 3, 1, 2)


def convnext_block(x, p):
    """4M's ConvNeXtBlock on NCHW: depthwise 7x7 -> LN -> Linear x4 -> GELU -> Linear -> gamma, residual."""
    c = x.shape[1]
    y = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), p["dwconv"]["w"], (1, 1), ((3, 3), (3, 3)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    y = layer_norm(y + p["dwconv"]["b"], p["norm"], 1e-6)
    y = linear(gelu(linear(y, p["pwconv1"])), p["pwconv2"]) * p["gamma"]
    return x + y.transpose(0, 3, 1, 2)


def vit_decoder(p, x, arch: ViTArch, patch_size: int, patch_proj: bool, post_mlp: bool,
                out_channels: int, out_conv: bool):
    """(B, D, nh, nw) -> (B, out_channels, nh*P, nw*P) (or (B, out, nh, nw) without patch_proj)."""
    b, d, nh, nw = x.shape
    t = x.transpose(0, 2, 3, 1).reshape(b, nh * nw, d) + pos_table(p["pos_emb"], nh, nw)
    t = linear(_trunk(t, p, arch, post_mlp), p["out_proj"])
    ps = patch_size if patch_proj else 1
    y = t.reshape(b, nh, nw, out_channels, ps, ps).transpose(0, 3, 1, 4, 2, 5)
    y = y.reshape(b, out_channels, nh * ps, nw * ps)
    if out_conv:
        for cp in p["out_conv"]:
            y = convnext_block(y, cp)
    return y
