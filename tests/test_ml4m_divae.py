"""4M's DiVAE diffusion decoder in JAX: parity with the reference fixture, schedulers, compile-once.

The fixture (../shared/fixtures/ml4m/tokenizers/divae_unet_rgb) was made by the unmodified ml-4m
code with tiny random weights; its README defines the tiny `unet_patched_tiny` that we register.
"""

from __future__ import annotations

import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from fourm.compat.ml4m_tokenizers import diffusion as D
from fourm.compat.ml4m_tokenizers import unet as U
from fourm.model.pretrained import CheckpointError

TINY = dict(patch_size=4, model_channels=32, num_res_blocks=1, attention_resolutions=[2], channel_mult=(1, 2))


@pytest.fixture(scope="module")
def fx(shared_dir):
    folder = shared_dir / "fixtures" / "ml4m" / "tokenizers" / "divae_unet_rgb"
    if not folder.is_dir():
        pytest.skip(f"fixture folder {folder} not found")
    U.register_unet_arch("unet_patched_tiny", **TINY)
    U.register_fixture_unets()  # the module's copy of the README's definition agrees (else: error)
    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    return dict(cfg=cfg, tensors=tensors, meta=json.loads((folder / "fixture.json").read_text()),
                arrays=dict(np.load(folder / "fixture.npz")), params=U.load_decoder_params(tensors, cfg))


def _cfg(fx, **kw):
    return {**fx["cfg"], **kw}


# ------------------------------------------------------------------------------ parity
def test_decode_matches_reference(fx):
    a = fx["arrays"]
    out = D.decode(fx["params"], a["quant"], noise=a["noise"], timesteps=a["timesteps"], cfg=fx["cfg"])
    diff = float(np.abs(np.asarray(out) - a["decoded"]).max())
    print(f"divae_unet_rgb decoded max abs diff {diff:.3g}")
    assert out.shape == a["decoded"].shape and diff < 1e-4
    # Not vacuous: a different noise or a step less moves the result far beyond the tolerance.
    other = D.decode(fx["params"], a["quant"], noise=a["noise"][::-1], timesteps=a["timesteps"], cfg=fx["cfg"])
    assert float(np.abs(np.asarray(other) - a["decoded"]).max()) > 1e-2


def test_unet_shares_one_timestep_embedding_over_the_batch(fx):
    a, arch = fx["arrays"], U.unet_arch(fx["cfg"])
    apply = jax.jit(U.apply_unet, static_argnums=0)
    one = apply(arch, fx["params"], a["noise"], jnp.int32(749), a["quant"])
    per = apply(arch, fx["params"], a["noise"], jnp.array([749, 749]), a["quant"])
    np.testing.assert_allclose(one, per, atol=1e-6)
    swapped = apply(arch, fx["params"], a["noise"][::-1], jnp.int32(749), a["quant"][::-1])
    np.testing.assert_allclose(one[::-1], swapped, atol=1e-5)  # images are independent


# ------------------------------------------------------------------------------ schedules
def test_timesteps_modes(fx):
    cfg, meta = fx["cfg"], fx["meta"]["decode"]
    ts = D.scheduler_timesteps(cfg, meta["num_inference_steps"], meta["scheduler_timesteps_mode"])
    assert ts.tolist() == meta["timesteps"] == fx["arrays"]["timesteps"].tolist()
    # ml-4m's set_timesteps formulas (arXiv 2305.08891, table 2) for the other modes.
    assert D.scheduler_timesteps(cfg, 4, "leading").tolist() == [750, 500, 250, 0]
    assert D.scheduler_timesteps(cfg, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert D.scheduler_timesteps(cfg, 3, "trailing").tolist() == [999, 666, 333, 0]  # numpy arange: 4 entries
    assert D.scheduler_timesteps(cfg, None, "trailing").tolist() == list(range(999, -1, -1))
    # The reference's DDPM set_timesteps swallows the mode: always 'leading'.
    assert D.scheduler_timesteps(_cfg(fx, scheduler="ddpm"), 4, "trailing").tolist() == [750, 500, 250, 0]
    with pytest.raises(ValueError, match="scheduler_timesteps_mode.*'middle'"):
        D.scheduler_timesteps(cfg, 4, "middle")
    with pytest.raises(ValueError, match="expected 1..1000.*1001"):
        D.scheduler_timesteps(cfg, 1001)


def test_alphas_cumprod_match_reference(fx):
    meta = fx["meta"]["decode"]
    acp = D.alphas_cumprod(D.scheduler_spec(fx["cfg"]))
    assert acp.dtype == np.float32 and acp.shape == (1000,)
    # torch's float32 kernels (MKL sqrt, vectorised linspace) round a few ulps differently.
    np.testing.assert_allclose(acp[meta["timesteps"]], meta["alphas_cumprod_at_timesteps"], rtol=2e-6, atol=1e-9)
    assert acp[-1] == 0.0 and np.all(np.diff(acp) < 0)
    plain = D.alphas_cumprod(D.scheduler_spec(_cfg(fx, zero_terminal_snr=False)))
    assert plain[-1] > 1e-5 and abs(plain[0] - acp[0]) < 1e-7  # zero SNR keeps the first value
    for name in ("scaled_linear", "squaredcos_cap_v2", "shifted_cosine:0.5"):
        a = D.alphas_cumprod(D.scheduler_spec(_cfg(fx, beta_schedule=name)))
        assert a[-1] == pytest.approx(0.0, abs=1e-6) and a[0] > 0.99 and np.all(np.diff(a) <= 0)
    with pytest.raises(ValueError, match="beta_schedule.*'sigmoid'.*ddim"):
        D.scheduler_spec(_cfg(fx, beta_schedule="sigmoid"))
    assert D.alphas_cumprod(D.scheduler_spec(_cfg(fx, scheduler="ddpm", beta_schedule="sigmoid")))[0] > 0.99


# ------------------------------------------------------------------------------ steps
def _x0_eps_xt(a_t, shape=(2, 3, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    x0 = np.clip(rng.standard_normal(shape) * 0.5, -1, 1).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    return x0, eps, (np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps).astype(np.float32)


@pytest.mark.parametrize("ptype", D.PREDICTION_TYPES)
def test_prediction_types_recover_x0_and_eps(ptype):
    spec = D.SchedulerSpec("ddim", prediction_type=ptype, zero_terminal_snr=False)
    acp = D.alphas_cumprod(spec)
    a_t = float(acp[600])
    x0, eps, xt = _x0_eps_xt(a_t)
    out = {"sample": x0, "epsilon": eps, "v_prediction": np.sqrt(a_t) * eps - np.sqrt(1 - a_t) * x0}[ptype]
    px0, peps = D._predict_x0_eps(spec, jnp.asarray(out), jnp.asarray(xt), jnp.float32(a_t))
    np.testing.assert_allclose(px0, x0, atol=2e-5)
    np.testing.assert_allclose(peps, eps, atol=2e-5)
    # An exact model makes DDIM (eta 0) land on the forward process at the previous timestep.
    prev = D.ddim_step(spec, jnp.asarray(acp), jnp.asarray(out), jnp.int32(600), jnp.asarray(xt), 200)
    a_p = float(acp[400])
    np.testing.assert_allclose(prev, np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps, atol=5e-5)


def test_ddim_last_step_returns_the_clipped_x0():
    spec = D.SchedulerSpec("ddim", prediction_type="sample", clip_sample=True)
    acp = jnp.asarray(D.alphas_cumprod(spec))
    out = jnp.linspace(-2, 2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    x = jnp.ones((2, 3, 4, 4))
    np.testing.assert_allclose(D.ddim_step(spec, acp, out, jnp.int32(249), x, 250), jnp.clip(out, -1, 1), atol=1e-6)


def test_dynamic_thresholding_quantile():
    spec = D.SchedulerSpec("ddim", thresholding=True, sample_max_value=3.0)
    x0 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32) * 2)
    got = D._threshold(spec, x0)
    flat = np.asarray(x0).reshape(2, -1)
    s = np.clip(np.quantile(np.abs(flat), 0.995, axis=1), 1, 3)[:, None]
    np.testing.assert_allclose(got, (np.clip(flat, -s, s) / s).reshape(x0.shape), atol=1e-6)
    assert float(jnp.abs(got).max()) == pytest.approx(1.0)
    # sample_max_value 1 (4M's default): plain clipping to [-1, 1].
    np.testing.assert_allclose(D._threshold(D.SchedulerSpec("ddim", thresholding=True), x0), jnp.clip(x0, -1, 1))


def test_ddpm_ancestral_step():
    spec = D.SchedulerSpec("ddpm", prediction_type="sample", zero_terminal_snr=False)
    acp = D.alphas_cumprod(spec)
    x0, _, xt = _x0_eps_xt(float(acp[500]), seed=2)
    z = np.random.default_rng(3).standard_normal(xt.shape).astype(np.float32)
    got = D.ddpm_step(spec, jnp.asarray(acp), jnp.asarray(x0), jnp.int32(500), jnp.asarray(xt), 250, jnp.asarray(z))
    # Posterior q(x_{t'} | x_t, x0) of DDPM (Ho et al. eq. 6-7) in float64, for t' = 250.
    a_t, a_p = np.float64(acp[500]), np.float64(acp[250])
    b = 1 - a_t / a_p
    mean = np.sqrt(a_p) * b / (1 - a_t) * x0 + np.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t) * xt
    np.testing.assert_allclose(got, mean + np.sqrt((1 - a_p) / (1 - a_t) * b) * z, atol=2e-5)
    # The last step (t = 0) adds no noise and returns x0.
    last = D.ddpm_step(spec, jnp.asarray(acp), jnp.asarray(x0), jnp.int32(0), jnp.asarray(xt), 1, jnp.asarray(z))
    np.testing.assert_allclose(last, x0, atol=1e-5)


def test_ddpm_decode_is_deterministic_given_the_key(fx):
    a, cfg = fx["arrays"], _cfg(fx, scheduler="ddpm")
    ts = D.scheduler_timesteps(cfg, 2)
    run = lambda k: np.asarray(D.decode(fx["params"], a["quant"], noise=a["noise"], timesteps=ts, cfg=cfg,
                                        key=jax.random.key(k)))
    first, again, other = run(0), run(0), run(1)
    assert np.array_equal(first, again) and np.isfinite(first).all()
    assert np.abs(first - other).max() > 1e-3
    # decode_quant: the reference's decode_quant signature, noise from the key; same key, same images.
    # (same shapes as above: no new compilation)
    q = D.decode_quant(fx["params"], a["quant"], cfg, key=jax.random.key(5), steps=2)
    assert np.array_equal(q, D.decode_quant(fx["params"], a["quant"], cfg, key=jax.random.key(5), steps=2))
    assert q.shape == (2, 3, 32, 32) and D.initial_noise(jax.random.key(0), cfg, 1, 16).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="ddpm.*pass key"):
        D.decode(fx["params"], a["quant"], noise=a["noise"], timesteps=ts, cfg=cfg)


# ------------------------------------------------------------------------------ compile once
def test_decode_compiles_once_per_shape(fx):
    a, cfg = fx["arrays"], fx["cfg"]
    quant, noise = a["quant"][:1], a["noise"][:1]  # batch 1: a shape no other test decodes
    before = D.TRACES["ddim"]
    outs = [D.decode(fx["params"], quant, noise=noise * s, timesteps=D.scheduler_timesteps(cfg, 3, mode),
                     cfg=cfg, num_inference_steps=3)
            for s, mode in ((1.0, "leading"), (0.5, "linspace"), (2.0, "leading"))]
    assert D.TRACES["ddim"] - before == 1
    assert not np.array_equal(outs[0], outs[2])


# ------------------------------------------------------------------------------ bad input
def test_load_errors_name_the_tensor(fx):
    t = dict(fx["tensors"])
    t.pop("decoder.middle_block.1.qkv.bias")
    t["decoder.extra.weight"] = np.zeros(3, np.float32)
    t["decoder.out.2.weight"] = np.zeros((48, 32, 1, 1), np.float32)
    with pytest.raises(CheckpointError) as e:
        U.load_decoder_params(t, fx["cfg"])
    msg = str(e.value)
    assert "\n" not in msg and "missing decoder.middle_block.1.qkv.bias" in msg
    assert "unexpected decoder.extra.weight" in msg
    assert "decoder.out.2.weight: expected (48, 32, 3, 3), got (48, 32, 1, 1)" in msg


def test_config_errors_name_the_key(fx):
    with pytest.raises(ValueError, match="dec_type.*'unet_huge'"):
        U.unet_arch(_cfg(fx, dec_type="unet_huge"))
    with pytest.raises(ValueError, match="UViT"):
        U.unet_arch(_cfg(fx, dec_type="uvit_b_p4_f16"))
    with pytest.raises(ValueError, match="config scheduler.*'pndm'"):
        D.scheduler_spec(_cfg(fx, scheduler="pndm"))
    with pytest.raises(ValueError, match="config prediction_type.*'x0'"):
        D.scheduler_spec(_cfg(fx, prediction_type="x0"))
    with pytest.raises(ValueError, match="config thresholding: expected bool"):
        D.scheduler_spec(_cfg(fx, thresholding=1))
    with pytest.raises(ValueError, match="missing key 'zero_terminal_snr'"):
        D.scheduler_spec({k: v for k, v in fx["cfg"].items() if k != "zero_terminal_snr"})
    with pytest.raises(ValueError, match="unknown keys \\['width'\\]"):
        U.register_unet_arch("bad", width=3, **TINY)
    with pytest.raises(ValueError, match="'unet_patched_tiny' is already registered"):
        U.register_unet_arch("unet_patched_tiny", **{**TINY, "model_channels": 64})
    with pytest.raises(ValueError, match="config conditioning.*'film'"):
        U.unet_arch(_cfg(fx, conditioning="film"))
    assert U.unet_arch(_cfg(fx, conditioning="xattn")) == U.unet_arch(fx["cfg"])  # ignored by the UNet
    with pytest.raises(ValueError, match="config latent_dim: expected int"):
        U.unet_arch(_cfg(fx, latent_dim=None))
    a = fx["arrays"]
    with pytest.raises(ValueError, match=r"quant: expected \(B, 32, h, w\)"):
        D.decode(fx["params"], a["quant"][:, :8], noise=a["noise"], timesteps=a["timesteps"], cfg=fx["cfg"])
    with pytest.raises(ValueError, match="divisible by the UNet patch size 4"):
        D.decode(fx["params"], a["quant"], noise=a["noise"][..., :30, :30], timesteps=a["timesteps"], cfg=fx["cfg"])
    with pytest.raises(ValueError, match=r"timesteps: values must lie in \[0, 1000\)"):
        D.decode(fx["params"], a["quant"], noise=a["noise"], timesteps=np.array([1000, 5]), cfg=fx["cfg"])


# ------------------------------------------------------------------------------ benchmark
def test_divae_bench_runs_at_tiny_size(fx):
    from fourm.bench.divae import bench_divae_decode, parse_runs

    res = bench_divae_decode("unet_patched_tiny", 32, parse_runs(["ddim:2"]), batch=1, iters=1, encoder_patch=8)
    assert [r.name for r in res] == ["divae.unet_patched_tiny@32.ddim2"]
    assert res[0].seconds > 0 and res[0].extra["steps"] == 2 and res[0].extra["latent_grid"] == [4, 4]
    assert res[0].flops is None or res[0].flops > 0
    assert parse_runs(["ddim:25", "ddpm:1000"]) == [("ddim", 25), ("ddpm", 1000)]
    from fourm.bench import suite
    from fourm.config import load_config

    full = load_config("bench").divae  # what the lead times: the released rgb tokenizer's decoder
    assert (full.arch, full.image_size, full.encoder_patch, tuple(full.runs)) == \
        ("unet_patched", 224, 16, ("ddim:25", "ddpm:1000"))
    assert "divae" in suite.GROUPS and "divae" not in load_config("bench").only
    with pytest.raises(ValueError, match="--runs.*'ddim'"):
        parse_runs(["ddim"])
