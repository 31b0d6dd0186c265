"""DiVAE (4M's diffusion tokenizer decoder) decode speed: one image, few-step DDIM vs full DDPM.

    python -m fourm.bench.divae                                   # released rgb size: 224 px, unet_patched
    python -m fourm.bench.divae --runs ddim:25,ddpm:1000 --image_size 224 --batch 1

It runs on JAX's default backend (set JAX_PLATFORMS=cpu to time the CPU on a GPU host).

The decoder is ml-4m's patched UNet (fourm.compat.ml4m_tokenizers) at the architecture named by
`arch`, with random weights of the released shapes (speed does not depend on what the weights
learned). The config is the released rgb tokenizer's (4M_tokenizers_rgb_16k_224-448: ViT-B/16
encoder -> 14 x 14 latents of 32 channels, unet_patched, prediction 'sample', linear betas, zero
terminal SNR, thresholding), with the scheduler swapped per run. One call = the whole denoising loop
(one jitted lax.scan) for `batch` images; FLOPs are one UNet evaluation (XLA cost analysis) times
the number of steps.
"""

from __future__ import annotations

from typing import Sequence

from fourm.bench.common import Result, peak_rss_bytes, reset_peak_rss, time_calls, xla_flops


def rgb_config(arch: str = "unet_patched", image_size: int = 224, latent_dim: int = 32, encoder_patch: int = 16,
               scheduler: str = "ddim") -> dict:
    """A DiVAE config.json as the released rgb tokenizer's, at another size / decoder / scheduler."""
    return dict(dec_type=arch, image_size=image_size, image_size_dec=None, n_channels=3, latent_dim=latent_dim,
                patch_size=encoder_patch, scheduler=scheduler, num_train_timesteps=1000, beta_schedule="linear",
                prediction_type="sample", zero_terminal_snr=True, thresholding=True, clip_sample=False,
                conditioning="concat")


def bench_divae_decode(arch: str = "unet_patched", image_size: int = 224, runs: Sequence[tuple[str, int]] = (
        ("ddim", 25), ("ddpm", 1000)), batch: int = 1, iters: int = 3, latent_dim: int = 32,
        encoder_patch: int = 16) -> list[Result]:
    """Decode `batch` images per call for each (scheduler, steps) in `runs`: seconds, images/s, FLOPs."""
    import jax
    import jax.numpy as jnp

    from fourm.compat.ml4m_tokenizers import diffusion, unet

    out = []
    for kind, steps in runs:
        cfg = rgb_config(arch, image_size, latent_dim, encoder_patch, kind)
        params = unet.random_decoder_params(cfg, seed=0)
        grid = image_size // encoder_patch
        quant = jax.random.normal(jax.random.key(1), (batch, latent_dim, grid, grid), jnp.float32)
        noise = diffusion.initial_noise(jax.random.key(2), cfg, batch)
        ts = diffusion.scheduler_timesteps(cfg, steps, "trailing")
        key = jax.random.key(3)

        def call():
            return jax.block_until_ready(diffusion.decode(params, quant, noise=noise, timesteps=ts, cfg=cfg,
                                                          key=key, num_inference_steps=steps))

        reset_peak_rss()
        t = time_calls(call, iters)
        arch_s = unet.unet_arch(cfg)
        one = xla_flops(lambda p, x, q: unet.apply_unet(arch_s, p, x, jnp.int32(999), q), params, noise, quant)
        out.append(Result(f"divae.{arch}@{image_size}.{kind}{steps}", t.median_s, batch / t.median_s, "images/s",
                          peak_rss=peak_rss_bytes(), flops=one * len(ts) if one else None, first_s=t.first_s,
                          cpu_s=t.cpu_s, extra=dict(batch=batch, steps=int(len(ts)), scheduler=kind,
                                                     latent_grid=[grid, grid], s_per_step=t.median_s / len(ts))))
    return out


def parse_runs(specs: Sequence[str]) -> list[tuple[str, int]]:
    """['ddim:25', 'ddpm:1000'] -> [('ddim', 25), ('ddpm', 1000)]."""
    runs = []
    for s in specs:
        kind, _, n = s.partition(":")
        if kind not in ("ddim", "ddpm") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--runs: expected scheduler:steps with scheduler ddim|ddpm, got {s!r}")
        runs.append((kind, int(n)))
    return runs


def main(argv):
    del argv
    from absl import flags

    from fourm.bench.common import format_table

    f = flags.FLAGS
    print(format_table(bench_divae_decode(f.arch, f.image_size, parse_runs(f.runs), f.batch, f.iters)))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("arch", "unet_patched", "UNet architecture name (fourm.compat.ml4m_tokenizers.unet)")
    flags.DEFINE_integer("image_size", 224, "decoded image side (pixels)")
    flags.DEFINE_list("runs", ["ddim:25", "ddpm:1000"], "scheduler:steps per figure")
    flags.DEFINE_integer("batch", 1, "images per call")
    flags.DEFINE_integer("iters", 3, "timed calls")
    app.run(main)
