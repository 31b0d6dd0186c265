"""The VQ-VAE: convolutional encoder -> quantizer -> convolutional decoder (Flax NNX).

Shapes: an image of `resolution` pixels becomes a `grid x grid` token map; each of the
`len(channels)` stages halves the side, after a 2x space-to-depth stem, so
`resolution == grid * 2 ** (len(channels))` (64 px, 3 stages -> 8x8; 224 px, 4 stages -> 14x14).
The stem works at half resolution (space-to-depth instead of a full-resolution conv) and the
decoder ends in a depth-to-space (pixel shuffle): this halves the cost of the most expensive
layers on CPU while keeping full-resolution output detail.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from fourm.tokenizers.quantizers import QuantizerOutput, make_quantizer


def space_to_depth(x: jax.Array, r: int) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // r, w // r, r * r * c)


def depth_to_space(x: jax.Array, r: int) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, r, r, c // (r * r)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * r, w * r, c // (r * r))


def upsample_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """`conv(nearest 2x upsampling of x)` for a 3x3 SAME conv, computed at x's resolution.

    Nearest upsampling repeats every pixel 2x2, so each of the four output phases (row parity a,
    column parity b) sees only two distinct input rows and columns: a 3x3 kernel collapses to a
    2x2 one per phase (rows: phase 0 = (k0, k1 + k2) on rows (i-1, i), phase 1 = (k0 + k1, k2) on
    rows (i, i+1); columns alike). The four phase kernels run as one 2x2 conv over x padded by
    one pixel, and the phases interleave into the 2x output: the same function with 16 instead of
    36 multiply-adds per output pixel and channel pair, the same parameters (a checkpoint of the
    resize-then-conv form loads unchanged; results agree to float rounding).
    """
    k = conv.kernel[...]  # [3, 3, cin, cout]
    if k.shape[:2] != (3, 3) or conv.padding != "SAME" or conv.strides not in (1, (1, 1), None):
        raise ValueError(f"upsample_conv needs a 3x3 SAME stride-1 conv, got kernel {k.shape}, "
                         f"padding {conv.padding!r}, strides {conv.strides!r}")
    cout = k.shape[-1]

    def collapse(w, axis):  # 3 taps -> (phase 0, phase 1) pairs of 2 taps along `axis`
        w0, w1, w2 = (jax.lax.index_in_dim(w, i, axis) for i in range(3))
        return (jax.numpy.concatenate([w0, w1 + w2], axis), jax.numpy.concatenate([w0 + w1, w2], axis))

    phases = [cw for rw in collapse(k, 0) for cw in collapse(rw, 1)]  # (a, b) = 00, 01, 10, 11
    y = jax.lax.conv_general_dilated(
        jax.numpy.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), jax.numpy.concatenate(phases, -1),
        (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H+1, W+1, 4*cout]
    b, h, w, _ = x.shape
    # Phase (a, b) reads the window that starts at padded row i + a, column j + b.
    out = jax.numpy.stack([y[:, a:a + h, c:c + w, (2 * a + c) * cout:(2 * a + c + 1) * cout]
                           for a in (0, 1) for c in (0, 1)], axis=3)  # [B, H, W, 4, cout]
    out = out.reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)
    return out + conv.bias[...] if conv.bias is not None else out


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if ch % g == 0 and ch // g >= 4:
            return g
    return 1


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(cin, num_groups=_groups(cin), rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
        self.norm2 = nnx.GroupNorm(cout, num_groups=_groups(cout), rngs=rngs)
        # Zero-initialised last conv: each block starts as the identity (stable early training).
        self.conv2 = nnx.Conv(cout, cout, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.skip = nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (self.skip(x) if self.skip is not None else x) + h


class Encoder(nnx.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], num_res_blocks: int,
                 latent_dim: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(4 * in_channels, channels[0], (3, 3), rngs=rngs)
        blocks, downs = [], []
        cin = channels[0]
        for i, ch in enumerate(channels):
            stage = []
            for _ in range(num_res_blocks):
                stage.append(ResBlock(cin, ch, rngs=rngs))
                cin = ch
            blocks.append(nnx.List(stage))
            if i < len(channels) - 1:  # the stem already did one of the halvings
                downs.append(nnx.Conv(cin, ch, (3, 3), strides=(2, 2), rngs=rngs))
                cin = ch
        self.blocks = nnx.List(blocks)
        self.downs = nnx.List(downs)
        self.mid = ResBlock(cin, cin, rngs=rngs)
        self.norm = nnx.GroupNorm(cin, num_groups=_groups(cin), rngs=rngs)
        self.out = nnx.Conv(cin, latent_dim, (1, 1), rngs=rngs)

    def __call__(self, x):
        h = self.stem(space_to_depth(x, 2))
        for i, stage in enumerate(self.blocks):
            for blk in stage:
                h = blk(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = self.mid(h)
        return self.out(nnx.silu(self.norm(h)))


class Decoder(nnx.Module):
    def __init__(self, out_channels: int, channels: Sequence[int], num_res_blocks: int,
                 latent_dim: int, *, rngs: nnx.Rngs):
        rev = list(reversed(channels))
        self.inp = nnx.Conv(latent_dim, rev[0], (3, 3), rngs=rngs)
        self.mid = ResBlock(rev[0], rev[0], rngs=rngs)
        blocks, ups = [], []
        cin = rev[0]
        for i, ch in enumerate(rev):
            stage = []
            for _ in range(num_res_blocks):
                stage.append(ResBlock(cin, ch, rngs=rngs))
                cin = ch
            blocks.append(nnx.List(stage))
            if i < len(rev) - 1:
                ups.append(nnx.Conv(cin, rev[i + 1], (3, 3), rngs=rngs))
                cin = rev[i + 1]
        self.blocks = nnx.List(blocks)
        self.ups = nnx.List(ups)
        self.norm = nnx.GroupNorm(cin, num_groups=_groups(cin), rngs=rngs)
        self.out = nnx.Conv(cin, 4 * out_channels, (3, 3), rngs=rngs)

    def __call__(self, z):
        h = self.mid(self.inp(z))
        for i, stage in enumerate(self.blocks):
            for blk in stage:
                h = blk(h)
            if i < len(self.ups):  # nearest 2x upsampling, then a 3x3 conv
                h = upsample_conv(self.ups[i], h)
        return depth_to_space(self.out(nnx.silu(self.norm(h))), 2)


class VQVAE(nnx.Module):
    """Encoder -> quantizer -> decoder. `in/out_channels` come from the modality's codec."""

    def __init__(self, cfg, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        m, q = cfg.model, cfg.quantizer
        stages = len(m.channels)
        if cfg.resolution != cfg.grid * 2 ** stages:
            raise ValueError(
                f"tokenizer config: resolution {cfg.resolution} != grid {cfg.grid} * 2**{stages} "
                f"(model.channels has {stages} stages, each halving the side)")
        self.quantizer = make_quantizer(q, rngs=rngs)
        latent = self.quantizer.input_dim
        self.encoder = Encoder(in_channels, m.channels, m.num_res_blocks, latent, rngs=rngs)
        self.decoder = Decoder(out_channels, m.channels, m.num_res_blocks, self.quantizer.code_dim,
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, QuantizerOutput]:
        qout = self.quantizer(self.encoder(x))
        return self.decoder(qout.z_q), qout

    def encode_ids(self, x: jax.Array) -> jax.Array:
        return self.quantizer(self.encoder(x)).ids

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        return self.decoder(self.quantizer.lookup(ids))
