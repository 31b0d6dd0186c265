"""4M's VQ-VAE (fourm/vq/vqvae.py: VQ, VQVAE) as pure functions of (params, array, cfg).

    quant, tokens = encode(params, x, cfg=cfg)      # x: (B,C,H,W) float, or (B,H,W) class ids
    tokens = tokenize(params, x, cfg=cfg)           # (B,h,w), or (B,num_codebooks,h,w)
    quant = tokens_to_embedding(params, tokens, cfg=cfg)
    decoded = decode_tokens(params, tokens, cfg=cfg)  # VQVAE: (B, n_labels or n_channels, H, W)

`cfg` is a `TokenizerConfig` (hashable, static); the `*_jit` variants are `jax.jit`-ed with it
static. Arrays follow 4M's layouts (NCHW) so outputs compare directly with the reference. The
pipeline, as 4M runs it: [undo ImageNet standardisation] -> [class-id embedding] -> encoder
(ViT or MLP) -> 1x1 quant_proj -> quantizer; decode: codebook lookup -> 1x1 post_quant_proj ->
decoder. DiVAE shares the encoder half; its diffusion decoder lives in `diffusion.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fourm.compat.ml4m_tokenizers.config import TokenizerConfig
from fourm.compat.ml4m_tokenizers.mlp import mlp_net
from fourm.compat.ml4m_tokenizers.quantize import QUANTIZERS
from fourm.compat.ml4m_tokenizers.vit import vit_decoder, vit_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv1x1(x, p):
    return jnp.einsum("bchw,cd->bdhw", x, p["w"]) + p["b"][:, None, None]


def prepare_input(params, x, cfg: TokenizerConfig):
    if cfg.undo_std:
        # 4M's denormalize is TF.normalize with mean -m/s and std 1/s (float32), then 2x - 1.
        mean = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], np.float32)
        std = np.array([1 / s for s in IMAGENET_STD], np.float32)
        x = 2.0 * ((x - mean[:, None, None]) / std[:, None, None]) - 1.0
    if cfg.n_labels is not None:
        x = params["cls_emb"][x].transpose(0, 3, 1, 2)
    return x.astype(jnp.float32)


def encoder_features(params, x, cfg: TokenizerConfig):
    """Prepared input -> the encoder's (B, enc_dim, h, w) features (before quant_proj)."""
    p = params["encoder"]
    if cfg.enc_vit:
        return vit_encoder(p, x, cfg.enc_arch, cfg.patch_size, cfg.patch_proj, cfg.post_mlp)
    return mlp_net(p, x, cfg.enc_arch)


def encode(params, x, cfg: TokenizerConfig):
    """4M's `encode`: (quant (B, latent_dim, h, w), tokens)."""
    h = conv1x1(encoder_features(params, prepare_input(params, x, cfg), cfg), params["quant_proj"])
    return QUANTIZERS[cfg.quant_type][0](params["quantize"], h, cfg)


def tokenize(params, x, cfg: TokenizerConfig):
    return encode(params, x, cfg)[1]


def tokens_to_embedding(params, tokens, cfg: TokenizerConfig):
    return QUANTIZERS[cfg.quant_type][1](params["quantize"], tokens, cfg)


def decode_quant(params, quant, cfg: TokenizerConfig):
    """VQVAE: quant (B, latent_dim, h, w) -> (B, out_channels, H, W)."""
    if cfg.cls != "VQVAE":
        raise ValueError(f"decode_quant is the VQVAE decoder; a {cfg.cls} decodes with its diffusion decoder")
    x = conv1x1(quant, params["post_quant_proj"])
    p = params["decoder"]
    if cfg.dec_vit:
        return vit_decoder(p, x, cfg.dec_arch, cfg.dec_patch_size, cfg.patch_proj, cfg.post_mlp,
                           cfg.out_channels, cfg.out_conv)
    return mlp_net(p, x, cfg.dec_arch)


def decode_tokens(params, tokens, cfg: TokenizerConfig):
    return decode_quant(params, tokens_to_embedding(params, tokens, cfg), cfg)


_jit = functools.partial(jax.jit, static_argnames="cfg")
encode_jit = _jit(encode)
tokenize_jit = _jit(tokenize)
tokens_to_embedding_jit = _jit(tokens_to_embedding)
decode_quant_jit = _jit(decode_quant)
decode_tokens_jit = _jit(decode_tokens)
