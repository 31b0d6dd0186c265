"""Quantizers (straight-through, EMA, dead-code restart, FSQ grid), losses, codecs, and the
runtime tokenizer's handling of bad input."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fourm.tokenizers import losses
from fourm.tokenizers.codecs import ClassesCodec, DepthCodec, make_codec
from fourm.tokenizers.image import ImageTokenizer, build_model, config_hash, WEIGHTS
from fourm.tokenizers.quantizers import (FiniteScalarQuantizer, VectorQuantizer, l2_normalize,
                                         make_quantizer, straight_through)
from fourm.tokenizers.recipes import base_config


# ---------------------------------------------------------------------------------------------
# VQ
# ---------------------------------------------------------------------------------------------
def _vq(k=16, d=4, **kw):
    return VectorQuantizer(k, d, rngs=nnx.Rngs(0), **kw)


def test_vq_picks_nearest_cosine_code_and_commitment_loss():
    vq = _vq(beta=0.5)
    z = jax.random.normal(jax.random.key(1), (3, 5, 4)) * 7.0  # scale must not matter (cosine)
    out = vq(z)
    zn = l2_normalize(z)
    sims = np.einsum("abd,kd->abk", zn, vq.codebook[...])
    np.testing.assert_array_equal(out.ids, sims.argmax(-1))
    np.testing.assert_allclose(out.z_q, vq.codebook[...][out.ids], atol=1e-6)
    expect = 0.5 * np.mean(np.sum((np.asarray(zn) - np.asarray(vq.codebook[...])[out.ids]) ** 2, -1))
    np.testing.assert_allclose(out.loss, expect, rtol=1e-5)


def test_straight_through_gradients():
    w = jax.random.normal(jax.random.key(2), (6, 3))
    x = jax.random.normal(jax.random.key(3), (6, 3))
    g = jax.grad(lambda x: jnp.sum(straight_through(x, jnp.round(x)) * w))(x)
    np.testing.assert_allclose(g, w)
    # Through the VQ: gradient w.r.t. the raw latent = gradient of the identity on normalised z.
    vq = _vq()
    f_vq = lambda z: jnp.sum(vq(z).z_q * w[None, :, :1].repeat(4, -1))  # noqa: E731
    f_id = lambda z: jnp.sum(l2_normalize(z) * w[None, :, :1].repeat(4, -1))  # noqa: E731
    z = jax.random.normal(jax.random.key(4), (1, 6, 4))
    np.testing.assert_allclose(jax.grad(f_vq)(z), jax.grad(f_id)(z), atol=1e-6)
    assert float(jnp.abs(jax.grad(f_vq)(z)).sum()) > 0


def test_vq_ema_update_without_restart():
    vq = _vq(k=4, d=2, decay=0.9, restart_threshold=0.0)
    vq.ema_count[...] = jnp.ones(4)
    old_sum = jnp.asarray(vq.ema_sum[...])
    z = l2_normalize(jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    ids = jnp.array([0, 0, 2])
    stats = vq.update_codebook(z, ids, jax.random.key(0))
    np.testing.assert_allclose(vq.ema_count[...], [0.9 + 0.2, 0.9, 0.9 + 0.1, 0.9], rtol=1e-6)
    exp_sum = 0.9 * old_sum + 0.1 * jnp.stack([z[0] + z[1], jnp.zeros(2), z[2], jnp.zeros(2)])
    np.testing.assert_allclose(vq.ema_sum[...], exp_sum, atol=1e-6)
    np.testing.assert_allclose(vq.codebook[...], l2_normalize(exp_sum), atol=1e-6)
    assert float(stats["vq/restarted"]) == 0


def test_vq_dead_code_restart():
    vq = _vq(k=8, d=3, decay=0.99, restart_threshold=0.05)  # dead: EMA count < 0.25
    z = l2_normalize(jax.random.normal(jax.random.key(5), (40, 3)))
    # First update: every EMA count starts at 0, so the whole codebook restarts on batch latents.
    stats = vq.update_codebook(z, jnp.zeros(40, jnp.int32), jax.random.key(1))
    assert float(stats["vq/restarted"]) == 7  # code 0 got 40 assignments and survives
    cb = np.asarray(vq.codebook[...])
    for k in range(1, 8):
        assert np.abs(np.asarray(z) - cb[k]).max(-1).min() < 1e-5, f"code {k} not a batch latent"
    # Codes used often stay; a code starved below the threshold is restarted.
    vq.ema_count[...] = jnp.full(8, 100.0).at[3].set(0.0)
    before = np.asarray(vq.codebook[...])
    ids = jnp.arange(40, dtype=jnp.int32) % 8
    stats = vq.update_codebook(z, ids, jax.random.key(2))
    assert float(stats["vq/restarted"]) == 1
    after = np.asarray(vq.codebook[...])
    assert np.abs(np.asarray(z) - after[3]).max(-1).min() < 1e-5
    assert not np.allclose(before[3], after[3])


# ---------------------------------------------------------------------------------------------
# FSQ
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 4, 4), (3, 2)])
def test_fsq_grid(levels):
    fsq = FiniteScalarQuantizer(levels)
    k = int(np.prod(levels))
    assert fsq.codebook_size == k and fsq.input_dim == len(levels)
    grid = np.asarray(fsq.grid())
    assert grid.shape == (k, len(levels))
    assert len({tuple(r) for r in grid.round(6)}) == k  # every id is a distinct grid point
    assert np.abs(grid).max() <= 1.0 + 1e-6
    # Dense inputs hit every level of every channel and every id is in range.
    z = jnp.asarray(np.random.default_rng(0).normal(size=(20000, len(levels))) * 3)
    out = fsq(z)
    ids = np.asarray(out.ids)
    assert ids.min() >= 0 and ids.max() < k
    for i, lv in enumerate(levels):
        assert len(np.unique(np.asarray(out.z_q)[:, i].round(6))) == lv
    # ids <-> codes round trip, and straight-through gradient is non-zero.
    np.testing.assert_allclose(fsq.lookup(out.ids), out.z_q, atol=1e-6)
    assert float(jnp.abs(jax.grad(lambda z: jnp.sum(fsq(z).z_q))(z[:8])).sum()) > 0


def test_fsq_codebook_size_must_match_levels():
    cfg = base_config("rgb", "tok_rgb", dict(kind="image"), "64,fsq").quantizer
    assert make_quantizer(cfg, rngs=nnx.Rngs(0)).codebook_size == 1024
    cfg.codebook_size = 1000
    with pytest.raises(ValueError, match="contradicts FSQ levels"):
        make_quantizer(cfg, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Losses and codecs
# ---------------------------------------------------------------------------------------------
def test_image_loss_and_psnr():
    x = jnp.zeros((2, 4, 4, 3))
    valid = jnp.ones((2, 4, 4), bool)
    loss, m = losses.image_loss(x + 0.2, x, valid)  # error 0.2 on [-1,1] = 0.1 on [0,1]
    np.testing.assert_allclose(loss, 0.04, rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], 20.0, rtol=1e-4)


def test_depth_loss_masks_invalid_and_robust_term_is_affine_invariant():
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
    valid = jnp.asarray(rng.uniform(size=(2, 8, 8)) > 0.2)
    y = t + 0.1
    base, m = losses.depth_loss(y, t, valid)
    y2 = y.at[..., 0].set(jnp.where(valid, y[..., 0], 99.0))  # garbage where invalid
    np.testing.assert_allclose(losses.depth_loss(y2, t, valid)[0], base, rtol=1e-6)
    np.testing.assert_allclose(m["l1_log"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(m["ssi"], 0.0, atol=1e-5)  # a shift is invisible to the robust term
    a = losses.robust_standardize(t[..., 0], valid)
    b = losses.robust_standardize(3.0 * t[..., 0] - 2.0, valid)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_normals_angular_loss():
    t = jnp.zeros((1, 2, 2, 3)).at[..., 2].set(1.0)
    y = jnp.zeros((1, 2, 2, 3)).at[..., 0].set(5.0)  # 90 degrees off, unnormalised
    valid = jnp.ones((1, 2, 2), bool)
    _, m = losses.normals_loss(y, t, valid)
    np.testing.assert_allclose(m["angle_deg"], 90.0, rtol=1e-4)
    g = jax.grad(lambda y: losses.normals_loss(y, t, valid)[0])(t)  # zero error: finite gradient
    assert np.all(np.isfinite(g))


def test_classes_loss_matches_cross_entropy():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, 3, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (2, 3, 3)))
    valid = jnp.ones((2, 3, 3), bool)
    loss, m = losses.classes_loss(logits, labels, valid)
    ref = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[..., None], -1))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_depth_codec_round_trip_and_invalid_pixels():
    codec = DepthCodec("depth", base_config("depth", "tok_depth", dict(kind="depth", min_depth=0.5,
                                                                         max_depth=20.0)).codec)
    d = np.random.default_rng(2).uniform(1, 9, (2, 8, 8)).astype(np.float32)
    d[0, 0, 0], d[0, 1, 1], d[1, 2, 2] = np.nan, np.inf, -1.0
    xin, valid = codec.to_input(jnp.asarray(d))
    assert int((~valid).sum()) == 3 and np.all(np.isfinite(xin))
    back = np.asarray(codec.from_output(xin))
    np.testing.assert_allclose(back[np.asarray(valid)], d[np.asarray(valid)], rtol=1e-5)
    # invalid pixels take their own image's median valid value (jitted too: the fill is computed
    # only when some pixel is invalid, and an all-valid batch is the plain transform)
    n = 2 * (np.log(d) - np.log(0.5)) / (np.log(20.0) - np.log(0.5)) - 1
    for fn in (codec.to_input, jax.jit(codec.to_input)):
        xin = np.asarray(fn(jnp.asarray(d))[0])[..., 0]
        for b, (i, j) in ((0, (0, 0)), (0, (1, 1)), (1, (2, 2))):
            np.testing.assert_allclose(xin[b, i, j], np.median(n[b][np.asarray(valid)[b]]), rtol=1e-5)
        ok = np.abs(d[1:]).clip(1, 9)
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(ok))[0])[..., 0],
                                   2 * (np.log(ok) - np.log(0.5)) / (np.log(20.0) - np.log(0.5)) - 1,
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Runtime tokenizer: shapes, dtypes, bad input
# ---------------------------------------------------------------------------------------------
def _tokenizer(recipe, modality, codec, arg="64,tiny"):
    cfg = base_config(modality, recipe, codec, arg)
    cfg.model.num_res_blocks = 0  # the smallest network: tests pin contracts, not quality
    _, model = build_model(cfg)
    return ImageTokenizer(cfg, nnx.split(model, WEIGHTS, ...)[1], chunk_size=4)


@pytest.fixture(scope="module")
def rgb_tok():
    return _tokenizer("tok_rgb", "rgb", dict(kind="image", channels=3))


def test_rgb_encode_decode_shapes(rgb_tok):
    x = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    ids = rgb_tok.encode(x)  # 5 = one full chunk of 4 + a padded one
    assert ids.shape == (5, 8, 8) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < rgb_tok.vocab_size
    np.testing.assert_array_equal(ids[1:], rgb_tok.encode(x[1:]))  # ids[4] came from a padded chunk
    rec = rgb_tok.decode(ids)
    assert rec.shape == x.shape and rec.dtype == np.uint8
    np.testing.assert_array_equal(rgb_tok.decode(ids.reshape(5, 64)), rec)  # flat ids accepted
    assert rgb_tok.grid == (8, 8) and rgb_tok.resolution == 64 and rgb_tok.modality == "rgb"
    assert rgb_tok.config_hash == config_hash(rgb_tok.cfg)
    assert rgb_tok.config_hash[:8] in rgb_tok.version


def test_config_hash_is_stable_and_ignores_run_fields():
    a = base_config("rgb", "tok_rgb", dict(kind="image"), "64")
    b = base_config("rgb", "tok_rgb", dict(kind="image"), "64")
    b.train.steps, b.workdir = 7, "elsewhere"
    assert config_hash(a) == config_hash(b)
    b.quantizer.codebook_size = 512
    assert config_hash(a) != config_hash(b)


def test_bad_rgb_inputs(rgb_tok):
    with pytest.raises(ValueError, match=r"expected a batch uint8\[B, 64, 64, 3\], got uint8\[2, 64, 64, 4\]"):
        rgb_tok.encode(np.zeros((2, 64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="expected spatial size 64x64, got 32x32"):
        rgb_tok.encode(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="got float32"):
        rgb_tok.encode(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="expected a batch"):
        rgb_tok.encode(np.zeros((64, 64, 3), np.uint8))  # unbatched


def test_resize_only_when_config_says_so(rgb_tok):
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rgb_tok.cfg.resize_input = True
    try:
        ids = rgb_tok.encode(x)
    finally:
        rgb_tok.cfg.resize_input = False
    assert ids.shape == (4, 8, 8)
    resized = rgb_tok.codec.resize(x, 64)
    assert resized.dtype == np.uint8 and resized.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(ids, rgb_tok.encode(resized))


def test_decode_rejects_bad_tokens(rgb_tok):
    with pytest.raises(ValueError, match=r"2 token ids outside \[0, 64\)"):
        rgb_tok.decode(np.array([[[0] * 8] * 7 + [[64, -1] + [0] * 6]]))
    with pytest.raises(ValueError, match=r"expected token ids \[B, 8, 8\]"):
        rgb_tok.decode(np.zeros((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match="must be integers"):
        rgb_tok.decode(np.zeros((1, 8, 8), np.float32))


def test_depth_nan_inf_masked_and_counted(caplog):
    tok = _tokenizer("tok_depth", "depth", dict(kind="depth", min_depth=0.5, max_depth=20.0))
    d = np.full((3, 64, 64), 3.0, np.float32)
    d[0, :2, :5] = np.nan
    d[2, 10, 10] = np.inf
    with caplog.at_level(logging.WARNING):
        ids, info = tok.encode(d, return_info=True)
    np.testing.assert_array_equal(info["invalid_pixels"], [10, 0, 1])
    assert "11 invalid pixels" in caplog.text
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    rec = tok.decode(ids)
    assert rec.dtype == np.float32 and np.all((rec >= 0.5) & (rec <= 20.0))
    with pytest.raises(ValueError, match="expected a batch float32 metres"):
        tok.encode(np.zeros((2, 64, 64, 1), np.float32))


def test_semseg_and_normals_codec_contracts():
    seg = make_codec(base_config("semseg", "tok_semseg", dict(kind="classes", num_classes=7)))
    labels = np.random.default_rng(0).integers(0, 7, (2, 64, 64)).astype(np.uint8)
    labels[1, 0, 0] = 255  # ignore_index: allowed, masked from the loss
    onehot, valid = seg.to_input(jnp.asarray(seg.check(labels, 64)))
    assert onehot.shape == (2, 64, 64, 7) and int((~valid).sum()) == 1
    np.testing.assert_array_equal(np.asarray(seg.from_output(onehot))[0], labels[0])
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 7\)"):
        seg.check(labels, 64)
    with pytest.raises(ValueError, match="expected int class ids"):
        seg.check(labels.astype(np.float32), 64)
    nrm = make_codec(base_config("normals", "tok_normal", dict(kind="normals")))
    n = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    n *= 3 / np.linalg.norm(n, axis=-1, keepdims=True)  # not unit: the codec normalises
    n[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"expected a batch float32 unit vectors\[B, 64, 64, 3\]"):
        nrm.check(n[..., :2], 64)
    xin, valid = nrm.to_input(jnp.asarray(nrm.check(n, 64)))
    assert int((~valid).sum()) == 1
    out = np.asarray(nrm.from_output(xin * 2.0))
    np.testing.assert_allclose(np.linalg.norm(out[np.asarray(valid)], axis=-1), 1.0, atol=1e-5)


def test_unknown_codec_and_bad_geometry():
    cfg = base_config("rgb", "tok_rgb", dict(kind="bogus"), "64,tiny")
    with pytest.raises(ValueError, match="codec.kind='bogus'"):
        make_codec(cfg)
    cfg = base_config("rgb", "tok_rgb", dict(kind="image"), "64,tiny")
    cfg.grid = 16
    with pytest.raises(ValueError, match="resolution 64 != grid 16"):
        build_model(cfg)
    assert isinstance(make_codec(base_config("semseg", "s", dict(kind="classes", num_classes=3))),
                      ClassesCodec)


@pytest.mark.parametrize("recipe", ["rgb", "depth", "normals", "semseg"])
@pytest.mark.parametrize("arg,grid", [("64", 8), ("224", 14), ("64,fsq", 8)])
def test_recipes_build_the_registry_grids(recipe, arg, grid):
    from fourm import modalities
    from fourm.config import REPO_ROOT, load_config
    from fourm.tokenizers.image import abstract_model
    from fourm.tokenizers.quantizers import codebook_size_of

    cfg = load_config(str(REPO_ROOT / "tokenizers" / f"{recipe}.py") + f":{arg}")
    assert cfg.grid == grid and cfg.resolution == int(arg.split(",")[0])
    abstract_model(cfg)  # shapes only: nothing allocated or compiled
    reg = modalities.get(f"{cfg.name}@{cfg.resolution}")
    assert reg.grid == (grid, grid) and reg.vocab_size == codebook_size_of(cfg.quantizer)


def test_tokenizer_mesh_uses_every_device_or_the_first_n():
    from fourm.tokenizers.train import data_parallel_mesh as make_mesh

    cfg = base_config("rgb", "tok_rgb", dict(kind="image", channels=3), "64")
    assert make_mesh(cfg).devices.size == jax.device_count()
    cfg.train.devices = 1
    assert list(make_mesh(cfg).devices.flat) == jax.devices()[:1]
    cfg.train.devices = jax.device_count() + 1
    with pytest.raises(ValueError, match="train.devices"):
        make_mesh(cfg)
    cfg.train.devices, cfg.train.batch_size = 0, jax.device_count() + 1
    with pytest.raises(ValueError, match="batch_size"):
        make_mesh(cfg)


@pytest.mark.parametrize("cin,cout,hw", [(8, 4, 4), (3, 5, 3)])
def test_upsample_conv_is_resize_then_conv(cin, cout, hw):
    """The decoder's upsampling at low resolution equals nearest 2x resize + the same 3x3 conv."""
    from fourm.tokenizers.vqvae import upsample_conv

    conv = nnx.Conv(cin, cout, (3, 3), rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(1), (cout,))
    x = jax.random.normal(jax.random.key(2), (2, hw, hw, cin))
    ref = conv(jax.image.resize(x, (2, 2 * hw, 2 * hw, cin), "nearest"))
    np.testing.assert_allclose(np.asarray(upsample_conv(conv, x)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3x3 SAME stride-1"):
        upsample_conv(nnx.Conv(cin, cout, (3, 3), strides=2, rngs=nnx.Rngs(0)), x)
