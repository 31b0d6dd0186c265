"""fourm.model: shapes, loss, attention structure, efficiency options, decoding API, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fourm import modalities as modreg
from fourm.model import BatchError, ModelSpec, build_model, loss_fn, model_config
from fourm.model import decoding, heads
from fourm.model.loss import reduce_loss
from fourm.model.synthetic import synthetic_batch
from fourm.model.validate import validate_batch

MODS = ["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]


def small_cfg(**kw):
    cfg = model_config("tiny", kw.pop("variant", "swiglu"))
    cfg.update(dim=32, num_heads=2, encoder_depth=2, decoder_depth=2, seq_pos_len=64)
    cfg.modalities = MODS
    cfg.vocab_overrides = {"tok_rgb@64": 40, "tok_depth@64": 24, "caption": 56}
    cfg.update(**kw)
    return cfg


def jbatch(b):
    return {k: jnp.asarray(v) for k, v in b.items()}


# XLA:CPU compile time dominates these tests; its backend optimisations do not change the maths.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, *args):
    """Compiled `fn` for these argument shapes (cheap compile), called like fn(*args)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def model():
    return build_model(small_cfg(), seed=0)


@pytest.fixture(scope="module")
def batch(model):
    return synthetic_batch(model.spec, 4, 24, 20, seed=1)


_VG_CACHE = {}


def value_and_grads(cfg_kw: dict, batch):
    """(loss, metrics, grads) of a seed-0 model built with small_cfg(**cfg_kw); cached."""
    key = tuple(sorted(cfg_kw.items()))
    if key not in _VG_CACHE:
        graphdef, params, rest = nnx.split(build_model(small_cfg(**cfg_kw), seed=0), nnx.Param, ...)

        def f(p, b):
            return loss_fn(nnx.merge(graphdef, p, rest), b)

        b = jbatch(batch)
        vg = fast_jit(jax.value_and_grad(f, has_aux=True), params, b)
        (loss, metrics), grads = vg(params, b)
        _VG_CACHE[key] = jax.device_get((loss, metrics, grads))
    return _VG_CACHE[key]


def tree_close(a, b, rtol=1e-4, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# parameter counts (4M's published transformer-only sizes), eval_shape: nothing is allocated
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,expected_m,digits", [("base", 198.8, 1), ("large", 705.7, 1), ("xlarge", 2823, 0)])
def test_transformer_param_counts_match_4m(size, expected_m, digits):
    cfg = model_config(size, "swiglu")
    cfg.family, cfg.modalities = "ml4m", list(modreg.ML4M_7)
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    state = nnx.state(abstract, nnx.Param)
    trunk = ("encoder", "decoder", "encoder_norm", "decoder_norm", "context_proj", "context_proj_bias")
    count = sum(int(np.prod(x.shape)) for k in trunk for x in jax.tree.leaves(state[k]))
    assert round(count / 1e6, digits) == expected_m


def test_mlp_hidden_rule_and_variants():
    assert build_model(small_cfg()).spec.mlp_hidden == int(2 * 4 * 32 / 3)
    gelu = build_model(small_cfg(variant="gelu"))
    assert gelu.spec.mlp_hidden == 128 and gelu.encoder.mlp.fc3 is None
    assert gelu.encoder.attn.qkv_bias is not None and gelu.encoder.norm1.bias is not None


# ------------------------------------------------------------------------------------------------
# forward, loss, heads
# ------------------------------------------------------------------------------------------------


def test_loss_metrics_and_grads_are_finite(batch):
    loss, metrics, grads = value_and_grads({}, batch)
    assert np.isfinite(float(loss))
    for name in ("tok_rgb@64", "tok_depth@64", "caption"):
        assert {f"loss/{name}", f"acc/{name}", f"tokens/{name}"} <= set(metrics)
    # 4M's 'mod' loss: plain mean of the per-modality means
    per = [float(metrics[f"loss/{n}"]) for n in ("tok_rgb@64", "tok_depth@64", "caption")]
    assert float(loss) == pytest.approx(np.mean(per), rel=1e-6)
    # near-uniform predictions at init: each loss close to log(V)
    assert abs(per[2] - np.log(56)) < 1.0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_chunked_head_equals_dense_head_including_grads(batch):
    # chunk 4 (small_cfg) with ~7 targets per modality per sample: several chunks and padding
    (l1, m1, g1), (l2, m2, g2) = value_and_grads({}, batch), value_and_grads({"head_impl": "dense"}, batch)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for k in m1:
        assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-6), k
    tree_close(g1, g2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", [4, 32, 128])
def test_own_vocab_loss_matches_dense_for_any_cotangent(chunk):
    # chunk 32 = full chunks of 32 rows + tail chunks of 8; 4 = full chunks only (no tail size)
    rng = np.random.default_rng(0)
    t, d, vocabs = 150, 16, (40, 24, 56)
    h = jnp.asarray(rng.normal(size=(1, t, d)), jnp.float32)
    head_ids = jnp.asarray(rng.choice(4, size=(1, t), p=[0.5, 0.2, 0.2, 0.1]), jnp.int32)  # 3 = none
    targets = jnp.asarray(rng.integers(0, 24, size=(1, t)), jnp.int32)
    weights = tuple(jnp.asarray(0.3 * rng.normal(size=(v, d)), jnp.float32) for v in vocabs)
    tw = jnp.asarray(rng.random((1, t)), jnp.float32)
    g_nll = jnp.asarray(rng.normal(size=(1, t)), jnp.float32)

    def objective(impl, with_nll):
        def f(h, w):
            loss, nll, _ = heads.own_vocab_loss(h, head_ids, targets, w, tw, impl=impl, chunk=chunk)
            return loss + (jnp.sum(g_nll * nll) if with_nll else 0.0)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    for with_nll in (False, True):  # fused gradients only / plus a cotangent on nll itself
        (v1, g1), (v2, g2) = objective("chunked", with_nll)(h, weights), objective("dense", with_nll)(h, weights)
        assert float(v1) == pytest.approx(float(v2), rel=1e-5)
        tree_close(g1, g2, rtol=1e-4, atol=1e-5)
    nll, correct = heads.own_vocab_nll(h, head_ids, targets, weights, chunk=chunk)
    nll_d, correct_d = heads.dense_nll(h, head_ids, targets, weights)
    np.testing.assert_allclose(np.asarray(nll), np.where(head_ids < 3, nll_d, 0.0), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(correct), np.asarray(correct_d & (head_ids < 3)))


def test_token_loss_is_mean_over_predictions(model):
    nll = jnp.asarray([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    head_ids = jnp.asarray([[0, 0, 1, 3], [2, 2, 3, 3]])  # 3 = no head (padding)
    correct = jnp.asarray([[1, 0, 1, 0], [1, 1, 0, 0]], bool)
    tok, _ = reduce_loss(model.spec, nll, correct, head_ids, "token")
    mod, metrics = reduce_loss(model.spec, nll, correct, head_ids, "mod")
    assert float(tok) == pytest.approx(15 / 5)
    assert float(mod) == pytest.approx((1.5 + 3.0 + 4.5) / 3)
    assert float(metrics["acc/tok_rgb@64"]) == pytest.approx(0.5)
    # a target modality without predictions contributes 0 and still counts (4M's forward_mod_loss)
    mod, _ = reduce_loss(model.spec, nll, correct, jnp.where(head_ids == 2, 3, head_ids), "mod")
    assert float(mod) == pytest.approx((1.5 + 3.0 + 0.0) / 3)


def test_scan_unrolled_and_remat_agree(batch):
    ref = value_and_grads({}, batch)
    for kw in (dict(scan_layers=False), dict(remat="none"), dict(remat="dots")):
        got = value_and_grads(kw, batch)
        assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-6), kw
        tree_close(got[2], ref[2], rtol=1e-4, atol=1e-7)


def test_bf16_compute_with_fp32_params(batch):
    m16 = build_model(small_cfg(dtype="bfloat16"), seed=0)
    graphdef, params, rest = nnx.split(m16, nnx.Param, ...)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    f = lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b)[0]  # noqa: E731
    b = jbatch(batch)
    l16 = fast_jit(f, params, b)(params, b)
    assert float(l16) == pytest.approx(float(value_and_grads({}, batch)[0]), rel=3e-2)
    grads = jax.eval_shape(jax.grad(f), params, b)  # traced, not compiled
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_same_seed_same_model_and_loss(batch):
    a, b = build_model(small_cfg(), seed=3), build_model(small_cfg(), seed=3)
    tree_close(nnx.state(a, nnx.Param), nnx.state(b, nnx.Param), rtol=0, atol=0)
    c = build_model(small_cfg(), seed=4)
    assert not np.array_equal(np.asarray(a.mask_token[...]), np.asarray(c.mask_token[...]))


# ------------------------------------------------------------------------------------------------
# attention structure
# ------------------------------------------------------------------------------------------------


_DECODERS = {}


def _decode(model, b):
    """Decoder output for batch b; one compiled function per model and batch shapes."""
    b = jbatch(b)
    key = (id(model), tuple(sorted((k, v.shape) for k, v in b.items())))
    if key not in _DECODERS:
        graphdef, state = nnx.split(model)
        fn = lambda st, b: (lambda m: m.decode(m.encode(b), b))(nnx.merge(graphdef, st))  # noqa: E731
        _DECODERS[key] = (fast_jit(fn, state, b), state)
    fn, state = _DECODERS[key]
    return np.asarray(fn(state, b))


def test_padding_and_other_modalities_do_not_leak(model, batch):
    spec = model.spec
    y0 = _decode(model, batch)
    b = {k: v.copy() for k, v in batch.items()}
    # change padding content (encoder and decoder) -> no valid output changes
    b["enc_ids"][~b["enc_valid"]] = 7
    b["dec_ids"][~b["dec_valid"]] = 9
    b["dec_pos"][~b["dec_valid"]] = 3
    y1 = _decode(model, b)
    np.testing.assert_allclose(y1[batch["dec_valid"]], y0[batch["dec_valid"]], atol=1e-6)
    # change the caption teacher-forcing tokens of sample 0 -> grid targets unchanged,
    # caption outputs before the changed slot unchanged (causal), at/after it changed
    cap = spec.index("caption")
    slots = np.flatnonzero((batch["dec_mod"][0] == cap) & batch["dec_valid"][0])
    assert len(slots) >= 3
    b = {k: v.copy() for k, v in batch.items()}
    j = slots[len(slots) // 2]
    b["dec_ids"][0, j] = (b["dec_ids"][0, j] + 1) % 56
    y2 = _decode(model, b)
    grid = (batch["dec_mod"][0] != cap) & batch["dec_valid"][0]
    np.testing.assert_allclose(y2[0, grid], y0[0, grid], atol=1e-6)
    np.testing.assert_allclose(y2[0, slots[slots < j]], y0[0, slots[slots < j]], atol=1e-6)
    assert np.abs(y2[0, j] - y0[0, j]).max() > 1e-4


def test_grid_targets_attend_bidirectionally(model, batch):
    spec = model.spec
    dep = spec.index("tok_depth@64")
    b = {k: v.copy() for k, v in batch.items()}
    s = int(np.flatnonzero([((b["dec_mod"][i] == dep) & b["dec_valid"][i]).sum() >= 3 for i in range(4)])[0])
    slots = np.flatnonzero((b["dec_mod"][s] == dep) & b["dec_valid"][s])
    y0 = _decode(model, b)
    b["dec_pos"][s, slots[-1]] = (b["dec_pos"][s, slots[-1]] + 1) % 64  # move the last query
    y1 = _decode(model, b)
    assert np.abs(y1[s, slots[0]] - y0[s, slots[0]]).max() > 1e-5  # an earlier query sees it


def test_encode_features_and_registers(batch):
    m = build_model(small_cfg(num_register_tokens=3), seed=0)
    enc = m.encode(jbatch(batch))
    assert enc.x.shape == (4, 3 + 24, 32) and enc.features.shape == (4, 24, 32)
    assert bool(np.all(np.asarray(enc.valid[:, :3])))
    assert np.all(np.isfinite(np.asarray(enc.features)))


# ------------------------------------------------------------------------------------------------
# decoding API used by the samplers
# ------------------------------------------------------------------------------------------------


def _with_targets(batch, mod, ids, targets, pos, valid):
    b = {k: v.copy() for k, v in batch.items()}
    b["dec_ids"], b["dec_targets"], b["dec_pos"] = ids, targets, pos
    b["dec_mod"] = np.full_like(ids, mod)
    b["dec_valid"] = b["dec_loss"] = valid
    return b


def test_kv_cached_decoding_equals_full_decoder(model, batch):
    spec = model.spec
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 56, (4, 21)).astype(np.int32)
    n = 20
    b = _with_targets(batch, spec.index("caption"), seq[:, :n], seq[:, 1:], np.tile(np.arange(n), (4, 1)),
                      np.ones((4, n), bool))
    full = np.asarray(model.logits(jnp.asarray(_decode(model, b)), "caption"))  # teacher forcing, causal
    enc = model.encode(jbatch(b))
    lengths = np.array([2, 1, 3, 1])
    logits, cache = decoding.ar_prefill(model, enc, "caption", jnp.asarray(seq[:, :3]), jnp.asarray(lengths), 8)
    np.testing.assert_allclose(logits, full[np.arange(4), lengths - 1], atol=2e-5)
    step = jax.jit(lambda c, t: decoding.ar_step(model, c, t))
    for _ in range(3):  # samples at different lengths advance together
        logits, cache = step(cache, jnp.asarray(seq[np.arange(4), lengths]))
        lengths = lengths + 1
        np.testing.assert_allclose(logits, full[np.arange(4), lengths - 1], atol=2e-5)
    assert np.asarray(cache.length).tolist() == lengths.tolist()


def test_predict_grid_equals_decoder_on_grid_targets(model, batch):
    spec = model.spec
    rng = np.random.default_rng(1)
    pos = np.stack([rng.permutation(64)[:20] for _ in range(4)]).astype(np.int32)
    valid = np.arange(20)[None, :] < np.array([[20], [5], [12], [1]])
    zeros = np.zeros((4, 20), np.int32)
    b = _with_targets(batch, spec.index("tok_depth@64"), zeros, zeros, pos, valid)
    full = np.asarray(model.logits(jnp.asarray(_decode(model, b)), "tok_depth@64"))
    got = decoding.predict_grid(model, model.encode(jbatch(b)), "tok_depth@64", jnp.asarray(pos), jnp.asarray(valid))
    assert got.shape == (4, 20, 24)
    np.testing.assert_allclose(np.asarray(got)[valid], full[valid], atol=2e-5)
    with pytest.raises(ValueError, match="sequence"):
        decoding.predict_grid(model, model.encode(jbatch(b)), "caption", jnp.asarray(pos), jnp.asarray(valid))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_unknown_modality_and_bad_config_are_named():
    with pytest.raises(KeyError, match="tok_nope"):
        build_model(small_cfg(modalities=MODS + ["tok_nope"]))
    with pytest.raises(KeyError, match="domains_out"):
        build_model(small_cfg(domains_out=["tok_rgb@64", "det"]))
    with pytest.raises(ValueError, match="num_heads"):
        build_model(small_cfg(num_heads=5))
    cfg = small_cfg()
    cfg.typo_key = 1
    with pytest.raises(KeyError, match="typo_key"):
        ModelSpec.from_config(cfg)


def test_batch_shape_errors(model, batch):
    b = dict(batch)
    b["enc_pos"] = b["enc_pos"][:, :-1]
    with pytest.raises(BatchError, match="enc_pos"):
        model.encode(jbatch(b))
    b = dict(batch)
    b["pixels/rgb@64"] = b["pixels/rgb@64"][:, :32]
    with pytest.raises(BatchError, match="pixels/rgb@64"):
        model.encode(jbatch(b))
    b = {k: v for k, v in batch.items() if k != "dec_targets"}
    with pytest.raises(BatchError, match="dec_targets"):
        loss_fn(model, jbatch(b))


def test_validate_batch_catches_bad_values(model, batch):
    spec = model.spec
    validate_batch(spec, batch)

    def broken(fn):
        b = {k: v.copy() for k, v in batch.items()}
        fn(b)
        return b

    rgb_tok = spec.index("tok_rgb@64")
    sel = (batch["enc_mod"] == rgb_tok) & batch["enc_valid"]
    cases = [
        (lambda b: b["enc_ids"].__setitem__(sel, 40), "outside its vocabulary"),
        (lambda b: b["dec_mod"].__setitem__(b["dec_valid"], 9), "modality indices"),
        (lambda b: b["dec_mod"].__setitem__(b["dec_valid"], spec.index("rgb@64")), "decoder targets"),
        (lambda b: b["enc_pos"].__setitem__(sel, 64), "outside"),
        (lambda b: b.__setitem__("extra", np.zeros(1)), "unknown keys"),
    ]
    for fn, msg in cases:
        with pytest.raises(BatchError, match=msg):
            validate_batch(spec, broken(fn))
    # a budget larger than the modality: 70 slots of an 8x8 grid in one sample
    spec2 = model.spec
    big = synthetic_batch(spec2, 1, 80, 8, seed=0)
    big["enc_mod"][0, :70], big["enc_pos"][0, :70], big["enc_valid"][0, :70] = rgb_tok, 0, True
    big["enc_ids"][0, :70] = 0
    with pytest.raises(BatchError, match="budget larger"):
        validate_batch(spec2, big)


def test_spec_roundtrips_through_config():
    spec = build_model(small_cfg(num_register_tokens=2, dtype="bfloat16")).spec
    again = ModelSpec.from_config(spec.to_config(), spec.modalities)
    assert again == spec
    assert dataclasses.asdict(again) == dataclasses.asdict(spec)


def test_numerics_follow_the_backend(monkeypatch):
    """Auto impls: the CPU-tuned head and attention on CPU, the library paths on accelerators;
    an explicit config value always wins."""
    from fourm.model import layers
    from fourm.model.fourm_model import head_impl

    bf16 = jnp.bfloat16
    assert (head_impl(""), layers.attention_impl("", bf16, 64)) == ("chunked", "xla")  # the test backend
    for backend, attn in (("gpu", "cudnn"), ("tpu", "jax")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert head_impl("") == "dense" and layers.attention_impl("", bf16, 64) == attn
        assert layers.attention_impl("", jnp.float32, 64) == "jax"
        assert head_impl("chunked") == "chunked" and layers.attention_impl("xla", bf16, 64) == "xla"
    with pytest.raises(ValueError, match="head_impl='fast'"):
        build_model(small_cfg(head_impl="fast"))
    monkeypatch.undo()
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 2, 8))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    np.testing.assert_allclose(layers.attend(q, k, v, mask, "jax", jnp.float32),
                               layers.attend(q, k, v, mask, "xla", jnp.float32), atol=1e-6)
