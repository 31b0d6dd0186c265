"""4M checkpoint loading: forward parity with the ml-4m fixture, generation replay through the
decoder API, converter errors, native save/load."""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fourm.compat import ml4m, ml4m_check
from fourm.model import decoding
from fourm.model.pretrained import CheckpointError, flat_params, load_pretrained, read_safetensors, write_safetensors

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("FOURM_ML4M_FIXTURE", REPO.parent / "shared" / "fixtures" / "ml4m" / "tiny_swiglu"))
pytestmark = pytest.mark.skipif(not (FIXTURE / "model.safetensors").is_file(),
                                reason=f"4M fixture not found at {FIXTURE} (set FOURM_ML4M_FIXTURE)")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def model():
    return ml4m.load(FIXTURE)


@pytest.fixture(scope="module")
def tensors():
    return read_safetensors(FIXTURE / "model.safetensors")


def test_forward_parity_with_4m(model):
    rows = ml4m_check.run_check(FIXTURE, model=model, compiler_options=FAST_COMPILE, sections=["forward"])
    failed = [(r.name, r.value, r.note) for r in rows if r.ok is False]
    assert not failed, failed
    checked = {r.name: r for r in rows if r.ok}
    for key in ("loss", "loss/caption", "encoder_out/rgb@224", "decoder_out/tok_depth@224",
                "target_logprob/caption", "logits_sample/tok_rgb@224", "argmax/tok_depth@224"):
        assert key in checked, key
    worst = max(float(r.value) for r in rows if r.ok and r.kind == "float")
    assert worst < 1e-4
    print("\n" + ml4m_check.format_table(rows))


def _jitted(model, fn):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a), compiler_options=FAST_COMPILE)
    return lambda *a: f(state, *a)


def test_generation_replay_through_decoder_api(model):
    """MaskGIT (commits forced from decode_step, as the fixture README prescribes) and greedy AR."""
    spec = model.spec
    g = np.load(FIXTURE / "generation.npz", allow_pickle=False)
    img = jnp.asarray(g["cond/rgb@224/tensor"].transpose(0, 2, 3, 1))
    rgb, dep, cap = spec.index("rgb@224"), spec.index("tok_depth@224"), spec.index("caption")
    n = 196

    def enc_batch(dep_tokens, dep_known, cap_ids=()):
        """Encoder slots: 196 RGB patches, then depth positions already decoded, then caption."""
        size = 2 * n + 1
        ids, mod, pos = (np.zeros((1, size), np.int32) for _ in range(3))
        valid = np.zeros((1, size), bool)
        mod[0, :n], pos[0, :n], valid[0, :n] = rgb, np.arange(n), True
        k = np.flatnonzero(dep_known)
        sl = slice(n, n + len(k))
        ids[0, sl], mod[0, sl], pos[0, sl], valid[0, sl] = dep_tokens[k], dep, k, True
        for j, t in enumerate(cap_ids):
            ids[0, 2 * n + j], mod[0, 2 * n + j], valid[0, 2 * n + j] = t, cap, True
        return dict(enc_ids=jnp.asarray(ids), enc_mod=jnp.asarray(mod), enc_pos=jnp.asarray(pos),
                    enc_valid=jnp.asarray(valid), **{"pixels/rgb@224": img})

    grid_step = _jitted(model, lambda m, b, q, v: jax.nn.log_softmax(
        decoding.predict_grid(m, m.encode(b), "tok_depth@224", q, v)))
    for run in ("depth_maskgit1", "depth_maskgit8"):
        tokens, when = g[f"{run}/tokens"], g[f"{run}/decode_step"]
        for s in range(len(g[f"{run}/num_tokens_per_step"])):
            todo = when >= s
            q = np.flatnonzero(todo)
            qpos = np.zeros((1, n), np.int32)
            qpos[0, :len(q)] = q
            lp = np.asarray(grid_step(enc_batch(tokens, ~todo), jnp.asarray(qpos),
                                      jnp.asarray(np.arange(n)[None] < len(q))))[0, :len(q)]
            want = g[f"{run}/step_argmax"][s, q]
            margin = g[f"{run}/step_top2_margin"][s, q]
            am = lp.argmax(-1)
            assert np.all((am == want) | (margin < 1e-4)), (run, s)
            np.testing.assert_allclose(lp[np.arange(len(q)), want], g[f"{run}/step_argmax_logprob"][s, q], atol=1e-4)

    # autoregressive caption: the encoder also sees the start sentinel of the target
    seq = g["caption_ar/sequence"]
    enc = model.encode(enc_batch(np.zeros(n, np.int64), np.zeros(n, bool), cap_ids=[seq[0]]))
    logits, cache = decoding.ar_prefill(model, enc, "caption", jnp.asarray(seq[None, :1]), jnp.array([1]), len(seq))
    step = _jitted(model, lambda m, c, t: decoding.ar_step(m, c, t))
    out, lps = [int(seq[0])], []
    for _ in range(int(g["caption_ar/num_generated"])):
        lp = np.asarray(jax.nn.log_softmax(logits[0]))
        out.append(int(lp.argmax()))
        lps.append(lp[out[-1]])
        logits, cache = step(cache, jnp.asarray([out[-1]]))
    assert out == seq.tolist()
    np.testing.assert_allclose(lps, g["caption_ar/step_argmax_logprob"], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# conversion, native checkpoints, CLI
# ------------------------------------------------------------------------------------------------


def test_convert_then_load_pretrained_is_identical(model, tmp_path, capsys):
    from fourm.cli.ml4m import main

    assert main(["fourm-ml4m", "convert", str(FIXTURE), str(tmp_path / "out")]) == 0
    again = load_pretrained(tmp_path / "out")
    assert again.spec == model.spec
    a, b = flat_params(model), flat_params(again)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    # the 4M tensors landed where they belong (transposed Linear, stacked blocks, shared mod_emb)
    t, _ = read_safetensors(FIXTURE / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(a["encoder/mlp/fc1"])[1], t["encoder.1.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(np.asarray(a["mod_emb/caption"]), t["decoder_embeddings.caption.mod_emb"][0, 0])
    doc = json.loads((tmp_path / "out" / "config.json").read_text())
    assert doc["format"] == "fourm" and doc["config"]["ml4m_config"]["dim"] == 48


def _fixture_copy(tmp_path, cfg_edit=None, tensor_edit=None, raw=None):
    d = tmp_path / "ck"
    d.mkdir()
    cfg = json.loads((FIXTURE / "config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    if raw is not None:
        (d / "model.safetensors").write_bytes(raw)
    elif tensor_edit:
        t, meta = read_safetensors(FIXTURE / "model.safetensors")
        tensor_edit(t, meta)
        write_safetensors(d / "model.safetensors", t, meta)
    else:
        shutil.copy(FIXTURE / "model.safetensors", d / "model.safetensors")
    return d


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("dim"), r"missing required 4M config keys \['dim'\]"),
    (lambda c: c.update(frobnicate=1), "unknown 4M config keys.*frobnicate"),
    (lambda c: c["domains_in"].append("tok_nope@224"), "modality 'tok_nope@224' is unknown"),
    (lambda c: c.update(decoder_sep_mask=False), "decoder_sep_mask"),
    (lambda c: c.update(act_layer="Tanh"), "act_layer"),
    (lambda c: c["domains_in"].append("t5_caption"), "t5_caption.*not supported"),
])
def test_bad_config_is_named(tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        ml4m.load(_fixture_copy(tmp_path, cfg_edit=edit))


def _transpose_fc1(t, meta):
    t["encoder.0.mlp.fc1.weight"] = np.ascontiguousarray(t["encoder.0.mlp.fc1.weight"].T)


@pytest.mark.parametrize("edit,match", [
    (_transpose_fc1, r"'encoder.0.mlp.fc1.weight' has shape \(48, 128\), expected \(128, 48\)"),
    (lambda t, m: t.pop("decoder.1.self_attn.proj.weight"), "'decoder.1.self_attn.proj.weight' is missing"),
    (lambda t, m: t.update({"decoder.7.extra.weight": np.zeros(3, np.float32)}),
     r"not used by the conversion.*decoder\.7\.extra\.weight"),
    (lambda t, m: t["encoder.0.norm1.bias"].__setitem__(0, 1.0), "norm1.bias.*norm_bias=false"),
    (lambda t, m: t["encoder_embeddings.caption.pos_emb"].__setitem__((0, 5, 0), 0.5), "pos_emb.*sin-cos"),
    (lambda t, m: m.clear(), "encoder_embeddings.*mod_emb' is missing"),
])
def test_bad_tensors_are_named(tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        ml4m.load(_fixture_copy(tmp_path, tensor_edit=edit))


def test_truncated_safetensors_is_named(tmp_path):
    raw = (FIXTURE / "model.safetensors").read_bytes()
    d = _fixture_copy(tmp_path, raw=raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        ml4m.load(d)
    (d / "model.safetensors").write_bytes(raw[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        ml4m.load(d)


def test_cli_check_reports_errors_with_status_2(tmp_path, capsys):
    from fourm.cli.ml4m import main

    d = _fixture_copy(tmp_path, cfg_edit=lambda c: c.pop("num_heads"))
    for name in ("batch.npz", "expected.npz"):
        shutil.copy(FIXTURE / name, d / name)
    assert main(["fourm-ml4m", "check", str(d)]) == 2
    assert "num_heads" in capsys.readouterr().err
    assert main(["fourm-ml4m", "frobnicate"]) == 2


def test_fixture_batch_errors_are_named(model):
    arrays = dict(np.load(FIXTURE / "batch.npz", allow_pickle=False))
    bad = dict(arrays, **{"tok_rgb@224/tensor": np.where(arrays["tok_rgb@224/tensor"] > 0, 99999, 0)})
    with pytest.raises(ml4m_check.FixtureError, match="outside the vocabulary"):
        ml4m_check.ml4m_batch_to_fourm(bad, model.spec)
    with pytest.raises(ml4m_check.FixtureError, match="num_encoder_tokens"):
        ml4m_check.ml4m_batch_to_fourm(arrays, model.spec, num_encoder_tokens=50)
    dam = arrays["tok_depth@224/decoder_attention_mask"].copy()
    dam[0, -1] = 5
    with pytest.raises(ml4m_check.FixtureError, match="decoder_attention_mask"):
        ml4m_check.ml4m_batch_to_fourm(dict(arrays, **{"tok_depth@224/decoder_attention_mask": dam}), model.spec)


# ------------------------------------------------------------------------------------------------
# every variant the converter supports, round-tripped through fourm -> 4M files -> fourm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    dict(act_layer="GELU", gated_mlp=False, qkv_bias=True, proj_bias=True, mlp_bias=True, norm_bias=True,
         num_register_tokens=2, share_modality_embeddings=False),
    dict(act_layer="SiLU", gated_mlp=True, qkv_bias=False, proj_bias=False, mlp_bias=False, norm_bias=False,
         qk_norm=True, decoder_causal_mask=True,
         domains_in=["rgb@224", "tok_dinov2_global", "caption"], domains_out=["tok_dinov2_global", "caption"]),
])
def test_variants_round_trip_through_4m_format(tmp_path, variant):
    from fourm.compat import ml4m_export
    from fourm.model.fourm_model import FourM
    from fourm.model.pretrained import assign_params

    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.update(encoder_depth=1, decoder_depth=1, **variant)
    spec = ml4m.spec_from_ml4m(cfg)
    # random values everywhere (LayerNorm scales too), so any misplaced tensor shows; numpy
    # values into an abstract model: no per-shape XLA compiles for initialisers
    model = nnx.eval_shape(lambda: FourM(spec, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    assign_params(model, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat_params(model).items()})
    ml4m_export.export(model, tmp_path / "4m")
    again = ml4m.load(tmp_path / "4m")
    assert again.spec == spec
    a, b = flat_params(model), flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    t, aliases = read_safetensors(tmp_path / "4m" / "model.safetensors")
    if variant.get("num_register_tokens"):
        assert t["register_tokens"].shape == (1, 2, 48) and not aliases
    else:
        assert "tok_dinov2_global" in spec.learned_pos_emb
        assert t["decoder.0.cross_attn.k_norm.weight"].shape == (12,)
