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


def test_cli_check_text_tokenizer_flag_is_checked_first(tmp_path, capsys):
    from fourm.cli.ml4m import main

    assert main(["fourm-ml4m", "check", str(FIXTURE), "--text_tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err


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
         num_register_tokens=2, share_modality_embeddings=False, mlp_ratio=3.0),
    dict(act_layer="SiLU", gated_mlp=True, qkv_bias=False, proj_bias=False, mlp_bias=False, norm_bias=False,
         qk_norm=True, decoder_causal_mask=True, mlp_ratio=2.5,
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


# ------------------------------------------------------------------------------------------------
# the generation replay reads everything from generation.json / .npz (no run key or modality built in)
# ------------------------------------------------------------------------------------------------


def _grid_arrays(key, out, name):
    tr = out.trace[name]
    return {f"{key}/tokens": out.tokens[name].reshape(-1), f"{key}/decode_step": tr["decode_step"][0],
            f"{key}/num_tokens_per_step": tr["num_tokens_per_step"][0],
            f"{key}/step_argmax": tr["step_ids"][:, 0], f"{key}/step_argmax_logprob": tr["step_logp"][:, 0]}


def test_generation_replay_follows_generation_json(model, tmp_path):
    """A fixture in the reference script's format with other run names, targets, schedules and
    conditions (token grid + text + pixels) replays as written. Its expected arrays come from
    fourm's Generator fed the raw data directly (this pins the reading of the files; 4M parity of
    the sampler itself is tiny_swiglu's generation section), and altering a condition in the file
    must change the verdict."""
    from fourm.compat.ml4m_generation import check_generation, format_report
    from fourm.generate.chain import Generator, Normalised, Target, TextIds

    g = np.load(FIXTURE / "generation.npz", allow_pickle=False)
    b = np.load(FIXTURE / "batch.npz", allow_pickle=False)
    depth = b["raw/tok_depth@224"][:1]
    cap = b["raw/caption_ids"][:1]
    cap_ids = cap[cap >= 0]  # the caption + [EOS], as 4M feeds a full text condition
    pixels = g["cond/rgb@224/tensor"]
    gen = Generator(model, loop="scan", text_ids=TextIds(num_sentinels=200), compiler_options=FAST_COMPILE)
    cond_a = {"tok_depth@224": depth, "caption": cap_ids[None]}
    out_a = gen.generate(cond_a, [Target("tok_rgb@224", steps=3, token_schedule="linear", temperature=0.0)],
                         return_trace=True)
    out_b = gen.generate({"rgb@224": Normalised(pixels.transpose(0, 2, 3, 1)), "tok_depth@224": depth},
                         [Target("caption", max_new_tokens=6, temperature=0.0)], return_trace=True)
    tb = out_b.trace["caption"]
    n = int(tb["length"][0])
    arrays = {"cond/tok_depth@224/tensor": depth, "cond/tok_depth@224/input_mask": np.zeros_like(depth, bool),
              "cond/caption/tensor": np.pad(cap_ids, (0, 4))[None].astype(np.int32),
              "cond/caption/input_mask": (np.arange(len(cap_ids) + 4) >= len(cap_ids))[None],
              "cond/rgb@224/tensor": pixels, "cond/rgb@224/input_mask": np.zeros((1, 196), bool),
              **_grid_arrays("rgb from depth+text", out_a, "tok_rgb@224"),
              "words/sequence": np.concatenate([[5], tb["generated"][0, :n]]),
              "words/num_generated": np.int64(n), "words/step_argmax_logprob": tb["step_logp"][0, :n],
              "words/merged": np.asarray(tb["merged"][0])}
    runs = [dict(key="rgb from depth+text", target_domain="tok_rgb@224", scheme="maskgit",
                 cond_domains=["tok_depth@224", "caption"], decoding_steps=3, token_decoding_schedule="linear",
                 num_tokens_per_step=out_a.trace["tok_rgb@224"]["num_tokens_per_step"][0].tolist(),
                 schedule=[dict(target_domain="tok_rgb@224", temperature=0.0, cfg_scale=1.0)]),
            dict(key="words", target_domain="caption", scheme="autoregressive", max_new_tokens=6,
                 cond_domains=["rgb@224", "tok_depth@224"], decoding_steps=None, token_decoding_schedule=None)]
    (tmp_path / "generation.json").write_text(json.dumps({"temperature": 0.0, "runs": runs}))
    np.savez(tmp_path / "generation.npz", **arrays)
    report = check_generation(model, tmp_path, loop="scan", compiler_options=FAST_COMPILE)
    assert report["ok"], format_report(report)
    assert list(report) == ["rgb from depth+text", "words", "ok"]
    counts = runs[0]["num_tokens_per_step"]  # MaskGIT queries every position still unknown
    assert len(counts) == 3 and report["rgb from depth+text"]["num_predictions"] == sum(
        196 - sum(counts[:s]) for s in range(3))

    # the text condition is read from the file: another caption gives other predictions
    other = dict(arrays, **{"cond/caption/tensor": np.roll(arrays["cond/caption/tensor"], 3, axis=1)})
    np.savez(tmp_path / "generation.npz", **other)
    report = check_generation(model, tmp_path, loop="scan", compiler_options=FAST_COMPILE)
    assert not report["rgb from depth+text"]["ok"] and report["words"]["ok"]

    # a schedule fourm computes differently from the recorded one is a FAIL row, not a crash
    runs[0]["token_decoding_schedule"] = "cosine"
    (tmp_path / "generation.json").write_text(json.dumps({"runs": runs}))
    report = check_generation(model, tmp_path, loop="scan", compiler_options=FAST_COMPILE)
    assert report["rgb from depth+text"] == {"schedule_equal": False, "ok": False}

    runs[0]["schedule"][0]["temperature"] = 0.7
    (tmp_path / "generation.json").write_text(json.dumps({"runs": runs}))
    with pytest.raises(ml4m_check.FixtureError, match="'rgb from depth\\+text'.*only greedy runs"):
        check_generation(model, tmp_path)
    runs[0]["schedule"][0].update(temperature=0.0, target_domain="tok_depth@224")
    (tmp_path / "generation.json").write_text(json.dumps({"runs": runs}))
    with pytest.raises(ml4m_check.FixtureError, match="also generates \\['tok_depth@224'\\]"):
        check_generation(model, tmp_path)
    del runs[0]["schedule"]
    runs[1]["cond_domains"].append("tok_normal@224")
    (tmp_path / "generation.json").write_text(json.dumps({"runs": runs}))
    with pytest.raises(ml4m_check.FixtureError, match="'tok_normal@224' is not a modality of the model"):
        check_generation(model, tmp_path)


def test_generator_reads_and_writes_4m_text(model, shared_dir):
    """4M's WordPiece tokenizer plugs into the Generator: a text condition is encoded as ml-4m
    encodes a caption (ids + [EOS]) and a generated caption decodes as ml-4m printed it."""
    from fourm.compat.ml4m_text import ML4MTextTokenizer
    from fourm.generate.chain import Generator, Normalised, Target

    wp = shared_dir / "fixtures" / "ml4m" / "tokenizers" / "wordpiece_text"
    if not wp.is_dir():
        pytest.skip("wordpiece fixture not available")
    gen = Generator(model, {"text": ML4MTextTokenizer.load(wp)}, loop="scan", compiler_options=FAST_COMPILE)
    assert gen.text_ids.num_sentinels == 200
    b = np.load(FIXTURE / "batch.npz", allow_pickle=False)
    states, _ = gen.prepare({"caption": str(b["raw/caption_text"][1])}, None, [])
    st = states["caption"]
    want = b["raw/caption_ids"][1]
    np.testing.assert_array_equal(st.ids[0][st.known[0]], want[want >= 0])
    g = np.load(FIXTURE / "generation.npz", allow_pickle=False)
    out = gen.generate({"rgb@224": Normalised(g["cond/rgb@224/tensor"].transpose(0, 2, 3, 1))},
                       [Target("caption", max_new_tokens=20, temperature=0.0)])
    assert out.text["caption"] == [str(g["caption_ar/decoded_text"]).removeprefix("[S_1] ")]


def test_check_command_on_another_variant(tmp_path):
    """`fourm-ml4m check` on a fixture of another size, activation and modalities (GELU MLP with
    biases, dim 32, tok_normal@224 + det): every row comes from the files, none is named in the
    code. The variant is a fourm model exported to 4M's format and its reference arrays are
    fourm's own, so this pins that the check generalises, not 4M numerics (tiny_swiglu does)."""
    from fourm.compat import ml4m_export
    from fourm.generate.chain import Generator, Normalised, Target, TextIds
    from fourm.model.fourm_model import FourM
    from fourm.model.pretrained import assign_params

    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.update(act_layer="GELU", gated_mlp=False, qkv_bias=True, proj_bias=True, mlp_bias=True,
               norm_bias=True, dim=32, num_heads=2, encoder_depth=1, decoder_depth=1,
               domains_in=["rgb@224", "tok_normal@224", "det"], domains_out=["tok_normal@224", "det"])
    spec = ml4m.spec_from_ml4m(cfg, verbose=False)
    variant = nnx.eval_shape(lambda: FourM(spec, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    assign_params(variant, {k: (rng.normal(size=v.shape) * 0.3).astype(np.float32)
                            for k, v in flat_params(variant).items()})
    d = tmp_path / "variant"
    ml4m_export.export(variant, d)
    # the tiny batch with its modalities renamed (same lengths and vocabularies: caption -> det,
    # tok_depth@224 -> tok_normal@224; tok_rgb@224 dropped)
    ren = {"caption": "det", "tok_depth@224": "tok_normal@224", "rgb@224": "rgb@224"}
    b = np.load(FIXTURE / "batch.npz", allow_pickle=False)
    batch = {k.replace(k.split("/")[0], ren[k.split("/")[0]], 1): b[k] for k in b.files if k.split("/")[0] in ren}
    batch.update(num_encoder_tokens=b["num_encoder_tokens"], num_decoder_tokens=b["num_decoder_tokens"])
    e = np.load(FIXTURE / "expected.npz", allow_pickle=False)
    template = {}
    for k in e.files:
        mod = k.split("/", 1)[1] if "/" in k else None
        if mod is None or mod in ren:
            template[k if mod is None else k.replace(mod, ren[mod])] = e[k]
    loaded = ml4m.load(d)
    expected = ml4m_check.compute_fourm_outputs(loaded, batch, template, FAST_COMPILE)
    expected = {k: v for k, v in expected.items() if k in template or k.startswith("logits_sample/")}
    expected.update({k: v for k, v in template.items() if k.startswith("logits_sample_pos/")})
    np.savez(d / "batch.npz", **batch)
    np.savez(d / "expected.npz", **expected)
    # one greedy MaskGIT run conditioned on pixels and text
    g = np.load(FIXTURE / "generation.npz", allow_pickle=False)
    det = b["raw/caption_ids"][0]
    det = det[det >= 0]
    gen = Generator(loaded, loop="scan", text_ids=TextIds(num_sentinels=200), compiler_options=FAST_COMPILE)
    out = gen.generate({"rgb@224": Normalised(g["cond/rgb@224/tensor"].transpose(0, 2, 3, 1)), "det": det[None]},
                       [Target("tok_normal@224", steps=1, temperature=0.0)], return_trace=True)
    arrays = {"cond/rgb@224/tensor": g["cond/rgb@224/tensor"], "cond/det/tensor": det[None],
              "cond/det/input_mask": np.zeros((1, len(det)), bool),
              **_grid_arrays("normals", out, "tok_normal@224")}
    np.savez(d / "generation.npz", **arrays)
    (d / "generation.json").write_text(json.dumps({"runs": [dict(
        key="normals", target_domain="tok_normal@224", scheme="maskgit", cond_domains=["rgb@224", "det"],
        decoding_steps=1, token_decoding_schedule="cosine")]}))

    rows = ml4m_check.run_check(d, compiler_options=FAST_COMPILE)  # what `fourm-ml4m check` runs
    assert ml4m_check.passed(rows), ml4m_check.format_table(rows)
    names = {r.name for r in rows if r.ok}
    for name in ("encoder_out/det", "decoder_out/tok_normal@224", "argmax/det", "normals/token_mismatches"):
        assert name in names, name
    assert not any("caption" in n or "depth" in n for n in names)
