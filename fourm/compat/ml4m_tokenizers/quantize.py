"""4M's quantizers at inference: `lucid` (VectorQuantize, cosine or euclidean EMA codebook) and
`memcodes` (multi-head codebook attention), as pure functions of (params, latents).

Latents are NCHW. Tokens are (B, H, W) for one codebook and (B, num_codebooks, H, W) for several,
as 4M returns them. `lucid` with num_codebooks > 1 shares one codebook across heads, with a
project_in / project_out Linear around it. Lookups from tokens repeat exactly what `encode` does
(4M's own `tokens_to_embedding` only works for one codebook, and memcodes only on 1 x 1 maps).
"""

from __future__ import annotations

import jax.numpy as jnp

from fourm.compat.ml4m_tokenizers.config import TokenizerConfig
from fourm.compat.ml4m_tokenizers.vit import linear


def l2norm(x, eps=1e-12):
    """torch F.normalize(p=2, dim=-1)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _to_tokens(x):
    b, d, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(b, h * w, d)


def _to_map(t, h, w):
    b, n, d = t.shape
    return t.reshape(b, h, w, d).transpose(0, 3, 1, 2)


def _token_grid(idx, h, w):
    """(B, N, heads) indices -> 4M's token layout."""
    b, n, heads = idx.shape
    if heads == 1:
        return idx[..., 0].reshape(b, h, w)
    return idx.reshape(b, h, w, heads).transpose(0, 3, 1, 2)


def _heads_last(tokens, heads):
    """4M's token layout -> (B, N, heads), and the grid size."""
    if heads == 1:
        b, h, w = tokens.shape
        return tokens.reshape(b, h * w, 1), h, w
    b, _, h, w = tokens.shape
    return tokens.reshape(b, heads, h * w).transpose(0, 2, 1), h, w


# ---------------------------------------------------------------------------------------------
# lucid
# ---------------------------------------------------------------------------------------------


def _lucid_out(p, codes, cfg, h, w):
    b, n, heads, d = codes.shape
    q = codes.reshape(b, n, heads * d)
    if heads > 1:
        q = linear(q, p["project_out"])
    return _to_map(q, h, w)


def lucid_quantize(p, z, cfg: TokenizerConfig):
    b, d, h, w = z.shape
    heads = cfg.num_codebooks
    x = _to_tokens(z)
    if heads > 1:
        x = linear(x, p["project_in"])
    x = x.reshape(b, h * w, heads, cfg.latent_dim)
    if cfg.norm_latents:
        x = l2norm(x)
    embed = p["embed"]
    if cfg.norm_codes:  # CosineSimCodebook: nearest by cosine, but the raw (non-unit) row is returned
        score = l2norm(x) @ l2norm(embed).T
    else:  # EuclideanCodebook: -(|x|^2 - 2 x.e + |e|^2), as 4M writes it
        score = -(jnp.sum(x * x, -1, keepdims=True) - 2 * x @ embed.T + jnp.sum(embed * embed, -1))
    idx = jnp.argmax(score, -1)
    return _lucid_out(p, embed[idx], cfg, h, w), _token_grid(idx, h, w)


def lucid_lookup(p, tokens, cfg: TokenizerConfig):
    idx, h, w = _heads_last(tokens, cfg.num_codebooks)
    return _lucid_out(p, p["embed"][idx], cfg, h, w)


# ---------------------------------------------------------------------------------------------
# memcodes
# ---------------------------------------------------------------------------------------------


def _memcodes_kv(p):
    k = jnp.einsum("hnd,hdc->hnc", p["codes"], p["to_k"])
    v = jnp.einsum("hnd,hdc->hnc", p["codes"], p["to_v"])
    return k, v


def _memcodes_values(v, idx, h, w):
    """idx (B, N, heads) -> (B, C, h, w) with channels (head, d) head-major."""
    heads = v.shape[0]
    out = v[jnp.arange(heads)[None, None, :], idx]  # (B, N, heads, d)
    b, n = idx.shape[:2]
    return _to_map(out.reshape(b, n, -1), h, w)


def memcodes_quantize(p, z, cfg: TokenizerConfig):
    b, d, h, w = z.shape
    heads = cfg.num_codebooks
    dh = d // heads
    q = _to_tokens(z).reshape(b, h * w, heads, dh) * dh ** -0.5
    k, v = _memcodes_kv(p)
    logits = jnp.einsum("bihd,hjd->bihj", q, k)
    idx = jnp.argmax(logits, -1)  # (B, N, heads)
    return _memcodes_values(v, idx, h, w), _token_grid(idx, h, w)


def memcodes_lookup(p, tokens, cfg: TokenizerConfig):
    idx, h, w = _heads_last(tokens, cfg.num_codebooks)
    return _memcodes_values(_memcodes_kv(p)[1], idx, h, w)


QUANTIZERS = {"lucid": (lucid_quantize, lucid_lookup), "memcodes": (memcodes_quantize, memcodes_lookup)}
