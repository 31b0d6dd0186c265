"""4M tokenizer speed: ViT VQ-VAE encode (images -> tokens) of fourm's JAX port of 4M's tokenizers.

    from fourm.bench.ml4m_tokenizer import bench_vqvae_encode
    bench_vqvae_encode()                                      # released size: vit_b_enc, 224 px, P16
    bench_vqvae_encode("vit_t_enc", image_size=32, patch_size=8, batch=2)   # tests: the fixtures' tiny ViT

The tokenizer is built from a 4M config (RGB, lucid cosine codebook, post_mlp, as the released
ViT-B VQ-VAEs) with random weights: speed does not depend on what the weights learned. The call
timed is the jitted `tokenize` on device arrays (no host transfer), float32, default matmul
precision of the backend. FLOPs per call are XLA's cost analysis of it (no loops inside).
"""

from __future__ import annotations

import numpy as np

from fourm.bench.common import Result, peak_rss_bytes, reset_peak_rss, time_calls, xla_flops


def random_vqvae(enc_type: str = "vit_b_enc", dec_type: str = "vit_b_dec", image_size: int = 224,
                 patch_size: int = 16, codebook_size: int = 16384, latent_dim: int = 32, seed: int = 0):
    """A 4M VQVAE tokenizer (fourm.compat.ml4m_tokenizers) with random weights."""
    from fourm.compat.ml4m_tokenizers import load as tload
    from fourm.compat.ml4m_tokenizers.config import parse_config, register_fixture_archs

    register_fixture_archs()  # the tiny vit_t_* names the tests use
    raw = dict(image_size=image_size, image_size_enc=None, image_size_dec=None, n_channels=3, n_labels=None,
               enc_type=enc_type, dec_type=dec_type, patch_proj=True, post_mlp=True, patch_size=patch_size,
               patch_size_dec=None, out_conv=False, quant_type="lucid", codebook_size=codebook_size,
               num_codebooks=1, latent_dim=latent_dim, norm_codes=True, norm_latents=False, undo_std=False)
    cfg = parse_config(raw, "VQVAE", source="bench config")
    rng = np.random.default_rng(seed)
    state = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in tload.expected_state(cfg).items()}
    return tload.Tokenizer(cfg, state, name=f"ml4m_{enc_type}@{image_size}")


def bench_vqvae_encode(enc_type: str = "vit_b_enc", image_size: int = 224, patch_size: int = 16,
                       batch: int = 8, iters: int = 3) -> list[Result]:
    """ViT VQ-VAE encode: images/s of the jitted tokenize."""
    import jax
    import jax.numpy as jnp

    from fourm.compat.ml4m_tokenizers import vqvae

    tok = random_vqvae(enc_type, enc_type.replace("_enc", "_dec"), image_size, patch_size)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (batch, 3, image_size, image_size)), jnp.float32)
    params = jax.device_put(tok.params)
    reset_peak_rss()
    t = time_calls(lambda: vqvae.tokenize_jit(params, x, cfg=tok.cfg), iters)
    flops = xla_flops(lambda p, a: vqvae.tokenize(p, a, tok.cfg), params, x)
    grid = image_size // patch_size
    return [Result(f"ml4m_tokenizer.{enc_type}@{image_size}.encode", t.median_s, batch / t.median_s, "images/s",
                   peak_rss=peak_rss_bytes(), flops=flops, first_s=t.first_s, cpu_s=t.cpu_s,
                   note="4M ViT VQ-VAE tokenize (random weights), jitted, device arrays",
                   extra=dict(batch=batch, grid=[grid, grid], patch_size=patch_size, vocab=tok.vocab_size))]
