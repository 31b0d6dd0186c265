"""4M masking: property tests (hypothesis), 4M format parity on the fixture, grain, bad input."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fourm import modalities
from fourm.batch import DEC_KEYS, ENC_KEYS, PIXELS_PREFIX
from fourm.masking import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GrainMasking,
    MaskingInputError,
    MaskingTransform,
    MixtureComponent,
    allocate,
    collate,
    default_config,
)
from fourm.masking import spans
from fourm.modalities import Modality
from fourm.text_layout import ML4M, TextLayout, merge_spans

SP = TextLayout()
CHUNK_RANGE = (200, 220)  # "field" ids that start a metadata chunk in the synthetic vocab
SEQ_VOCAB = 300
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# random configurations and samples
# ------------------------------------------------------------------------------------------------
@st.composite
def setups(draw):
    mods = []
    for j in range(draw(st.integers(0, 3))):
        grid = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        mods.append(Modality(f"g{j}", "grid", draw(st.integers(1, 40)), grid))
    if draw(st.booleans()):
        mods.insert(0, Modality("px", "pixels", grid=(draw(st.integers(1, 4)), 2), patch_size=2,
                                channels=3, source="rgb"))
    for j in range(draw(st.integers(0, 2))):
        mods.append(Modality(f"s{j}", "sequence", SEQ_VOCAB, max_length=draw(st.integers(1, 24)),
                             masking=draw(st.sampled_from(["span", "chunk"]))))
    if not any(m.kind != "pixels" for m in mods):
        mods.append(Modality("g_last", "grid", 7, (2, 3)))
    n = len(mods)
    can_t = [m.kind != "pixels" for m in mods]
    comps = []
    for c in range(draw(st.integers(1, 3))):
        a_in = [draw(st.sampled_from([0.0, 0.05, 0.5, 1.0, 5.0])) for _ in mods]
        a_t = [draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])) if ok else 0.0 for ok in can_t]
        if not any(a_in):
            a_in[draw(st.integers(0, n - 1))] = 0.5
        if not any(a_t):
            a_t[draw(st.sampled_from([i for i in range(n) if can_t[i]]))] = 0.5
        keep = tuple(draw(st.sampled_from(["random", "all", "binary"])) for _ in mods)
        comps.append(MixtureComponent(draw(st.floats(0.1, 1.0)), tuple(a_in), tuple(a_t), keep, f"c{c}"))
    t = MaskingTransform(mods, draw(st.integers(1, 48)), draw(st.integers(0, 48)), comps,
                         chunk_start_range=CHUNK_RANGE, strict_budgets=False)
    return t, draw(st.integers(0, 2**31 - 1))


def make_sample(t: MaskingTransform, rng: np.random.Generator):
    """Random data per modality; sequences sometimes longer than max_length (4M truncates)."""
    sample, raw = {}, {}
    for m in t.modalities:
        if m.kind == "grid":
            sample[m.name] = rng.integers(0, m.vocab_size, m.grid)
        elif m.kind == "pixels":
            sample[m.name] = rng.integers(0, 256, (m.grid[0] * 2, m.grid[1] * 2, 3), dtype=np.uint8)
        elif m.masking == "span":
            ids = rng.integers(SP.sentinel_base + SP.num_sentinels, SEQ_VOCAB, rng.integers(0, m.max_length + 4))
            sample[m.name], raw[m.name] = ids, [[int(v)] for v in ids]
        else:  # metadata-like chunks: one field id then 0-2 value ids
            chunks = [[int(rng.integers(*CHUNK_RANGE))] + rng.integers(230, SEQ_VOCAB, rng.integers(0, 3)).tolist()
                      for _ in range(rng.integers(0, m.max_length // 2 + 3))]
            sample[m.name] = np.array(sum(chunks, []), np.int64)
            raw[m.name] = chunks
    return sample, raw


def expected_tokens(chunks, max_length):
    """4M: append [EOS] as its own unit, keep the whole units that fit in max_length."""
    out = []
    for c in chunks + [[SP.eos_id]]:
        if len(out) + len(c) > max_length:
            break
        out += c
    return out


def blocks(out, prefix, i):
    sel = out[f"{prefix}_valid"] & (out[f"{prefix}_mod"] == i)
    return np.flatnonzero(sel)


def check_invariants(t: MaskingTransform, sample, raw, out, info):
    spec = t.output_spec()
    assert list(out) == list(spec)
    for k, (shape, dtype) in spec.items():
        assert out[k].shape == shape and out[k].dtype == dtype, k
    comp = t.components[info.component]
    for side in ("enc", "dec"):
        valid = out[f"{side}_valid"]
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any()  # padding only at the end
        for k in (ENC_KEYS if side == "enc" else DEC_KEYS):
            if out[k].dtype != bool:
                assert (out[k][n:] == 0).all(), k
        mods, pos = out[f"{side}_mod"][:n], out[f"{side}_pos"][:n]
        assert (np.diff(mods) >= 0).all()  # modality order
        for i in np.unique(mods):
            assert (np.diff(pos[mods == i]) > 0).all()  # ascending position within a modality
    assert out["dec_loss"].tolist() == out["dec_valid"].tolist()

    n_enc, n_dec = int(out["enc_valid"].sum()), int(out["dec_valid"].sum())
    assert n_enc == sum(info.num_inputs.values()) <= t.input_budget
    assert n_dec == sum(info.num_targets.values()) <= t.target_budget
    for i, m in enumerate(t.modalities):
        e, d = blocks(out, "enc", i), blocks(out, "dec", i)
        assert len(e) == info.num_inputs[m.name] and len(d) == info.num_targets[m.name]
        if comp.input_alphas[i] == 0:
            assert len(e) == 0
        if comp.target_alphas[i] == 0:
            assert len(d) == 0
        if m.is_image_like:
            ep, dp = out["enc_pos"][e], out["dec_pos"][d]
            assert not set(ep) & set(dp)  # input and target disjoint
            assert ((ep >= 0) & (ep < m.num_tokens)).all() and ((dp >= 0) & (dp < m.num_tokens)).all()
            if m.kind == "pixels":
                assert len(d) == 0 and (out["enc_ids"][e] == 0).all()
            else:
                flat = np.asarray(sample[m.name]).reshape(-1)
                assert (out["enc_ids"][e] == flat[ep]).all() and (out["dec_targets"][d] == flat[dp]).all()
                assert (out["dec_ids"][d] == 0).all()  # grid targets never leak their ids
            # "Where possible": a budget is short only if this modality could take no more.
            if n_enc < t.input_budget and comp.input_alphas[i] > 0:
                assert len(e) == m.num_tokens
            if n_dec < t.target_budget and comp.target_alphas[i] > 0:
                assert len(e) + len(d) == m.num_tokens
        else:
            inp = out["enc_ids"][e]
            assert (out["enc_pos"][e] == np.arange(len(e))).all()
            assert (out["dec_pos"][d] == np.arange(len(d))).all()
            original = expected_tokens(raw[m.name], m.max_length)
            full = info.full_targets[m.name]
            assert merge_spans(inp, full, SP) == original  # spans + input = the text
            assert full[0] == SP.sentinel(1) and SP.is_sentinel(full[-1:]).all()
            if len(d):
                emitted = np.concatenate([out["dec_ids"][d[:1]], out["dec_targets"][d]])
                assert (out["dec_ids"][d[1:]] == out["dec_targets"][d[:-1]]).all()  # teacher forcing
                assert SP.is_sentinel(emitted[:1]).all()
                starts = [s for s in range(len(full) - len(emitted) + 1)
                          if (full[s:s + len(emitted)] == emitted).all()]
                assert starts, "emitted target is not a slice of the full span target"
            if m.masking == "chunk":  # whole chunks: every span starts with a field id or is [EOS]
                after = full[np.flatnonzero(SP.is_sentinel(full[:-1])) + 1]
                field = (after >= CHUNK_RANGE[0]) & (after < CHUNK_RANGE[1])
                assert (field | (after == SP.eos_id) | SP.is_sentinel(after)).all()
            for k, ids in (("enc_ids", inp), ("dec_targets", out["dec_targets"][d])):
                assert ((ids >= 0) & (ids < m.vocab_size)).all(), k


@PROPS
@given(setups())
def test_masking_properties(setup):
    t, seed = setup
    rng = np.random.default_rng(seed)
    for _ in range(3):
        sample, raw = make_sample(t, rng)
        out, info = t.apply(sample, rng)
        check_invariants(t, sample, raw, out, info)


@PROPS
@given(setups())
def test_deterministic_for_a_seed(setup):
    t, seed = setup
    sample, _ = make_sample(t, np.random.default_rng(seed))
    a, b = t(sample, np.random.default_rng(seed)), t(sample, np.random.default_rng(seed))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@PROPS
@given(st.integers(0, 300), st.lists(st.floats(0.0, 5.0), min_size=1, max_size=6),
       st.lists(st.integers(0, 80), min_size=6, max_size=6), st.integers(0, 2**31 - 1))
def test_allocate_exact_and_capped(budget, p, cap, seed):
    p = np.array(p)
    cap = np.array(cap[:len(p)])
    counts = allocate(budget, p, cap, np.random.default_rng(seed))
    assert (counts >= 0).all() and (counts <= cap).all() and (counts[p == 0] == 0).all()
    assert counts.sum() == min(budget, cap[p > 0].sum())


def _rgb_depth_caption_sample(rng: np.random.Generator, cap: np.ndarray) -> dict:
    return {"rgb@64": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "tok_rgb@64": rng.integers(0, 1024, (8, 8)), "tok_depth@64": rng.integers(0, 1024, 64),
            "caption": cap}


def test_budgets_exact_on_scene_config():
    t = MaskingTransform(modalities.resolve(["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]), 64, 64)
    rng = np.random.default_rng(0)
    for j in range(50):
        out = t(_rgb_depth_caption_sample(rng, rng.integers(300, 4096, rng.integers(0, 30))), rng)
        assert out["enc_valid"].all() and out["dec_valid"].all(), j  # images always have room here


def test_dirichlet_mean_share():
    a, b = Modality("a", "grid", 10, (8, 8)), Modality("b", "grid", 10, (8, 8))
    t = MaskingTransform([a, b], 32, 32, "all2all", alpha=0.5)
    rng = np.random.default_rng(0)
    shares = [t.apply({"a": np.zeros(64, int), "b": np.zeros(64, int)}, rng)[1].num_inputs["a"]
              for _ in range(400)]
    assert abs(np.mean(shares) / 32 - 0.5) < 0.07  # symmetric alphas: equal expected share
    assert np.std(shares) > 5  # alpha 0.5 spreads the split widely (not a fixed half)


def test_span_mask_format_and_crop():
    tokens = np.array([10, 11, 12, 13, 14, SP.eos_id], np.int32)
    kept = np.array([1, 0, 0, 1, 0, 0], bool)
    inp, tgt = spans.span_mask(tokens, np.arange(6), kept, SP)
    assert inp.tolist() == [10, 5, 13, 6]
    assert tgt.tolist() == [5, 11, 12, 6, 14, 3, 7]
    rng = np.random.default_rng(0)
    for slots in range(0, 8):
        c = spans.crop_target(tgt, slots, SP, rng)
        assert len(c) - 1 <= slots and (len(c) == 0 or SP.is_sentinel(c[:1]).all())
    # Lowering the keep threshold never lengthens the input: the chosen set fits the budget.
    unit_len = np.ones(40, int)
    for b in range(1, 41):
        k = spans.choose_kept_units(unit_len, b, 1.0, np.random.default_rng(b))
        assert len(spans.span_mask(np.arange(40) + 200, np.arange(40), k, SP)[0]) <= b


def test_pixels_normalised_as_imagenet():
    t = MaskingTransform(modalities.resolve(["rgb@64", "tok_rgb@64"]), 16, 16, "rgb2all")
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = t({"rgb@64": img, "tok_rgb@64": np.zeros((8, 8), int)}, np.random.default_rng(0))
    ref = (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[PIXELS_PREFIX + "rgb@64"], ref, atol=1e-5)
    assert (out["enc_mod"][out["enc_valid"]] == 0).all()  # rgb2all: inputs only from rgb pixels
    assert (out["dec_mod"][out["dec_valid"]] == 1).all()


def test_x2all_presets_take_every_input_from_one_modality():
    """`<X>2all` (4M's rgb2all, generalised): the whole input from X, never X as a target; a
    sequence source is kept whole (generation conditions on all of a caption)."""
    mods = modalities.resolve(["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"])
    t = MaskingTransform(mods, 64, 64, "caption2all")
    (comp,) = t.components
    assert comp.input_alphas == (0.0, 0.0, 0.0, 1.0) and comp.target_alphas == (0.0, 0.5, 0.5, 0.0)
    assert comp.keep[3] == "all"
    rng = np.random.default_rng(0)
    for _ in range(20):
        cap = rng.integers(300, 4096, rng.integers(1, 30))
        out = t(_rgb_depth_caption_sample(rng, cap), rng)
        enc = out["enc_mod"][out["enc_valid"]]
        assert (enc == 3).all()
        # every caption id reaches the encoder (plus the layout's own start/end markers)
        assert set(cap.tolist()) <= set(out["enc_ids"][out["enc_valid"]].tolist())
        assert not (out["dec_mod"][out["dec_valid"]] == 3).any()
    # a modality name works as well as a source; the preset name says what is wrong
    (comp,) = MaskingTransform(mods, 32, 32, "tok_depth@642all").components
    assert comp.input_alphas == (0.0, 0.0, 1.0, 0.0) and comp.target_alphas[2] == 0.0
    with pytest.raises(ValueError, match=r"'normals2all' needs an input modality named or sourced 'normals'"):
        MaskingTransform(mods, 32, 32, "normals2all")
    with pytest.raises(ValueError, match=r"unknown mixture preset 'all2none'"):
        MaskingTransform(mods, 32, 32, "all2none")


# ------------------------------------------------------------------------------------------------
# 4M parity: format of the fixture's masked captions, ml4m modalities end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml4m_batch(shared_dir):
    path = shared_dir / "fixtures/ml4m/tiny_swiglu"
    if not (path / "batch.npz").exists():
        pytest.skip("ml4m fixture not available")
    return (dict(np.load(path / "batch.npz", allow_pickle=False)),
            dict(np.load(path / "expected.npz", allow_pickle=False)))


def test_span_format_matches_ml4m_fixture(ml4m_batch):
    batch, expected = ml4m_batch
    sp = ML4M
    for b in range(2):
        raw = batch["raw/caption_ids"][b]
        tokens = raw[raw >= 0].astype(np.int32)  # includes ml-4m's [EOS]
        t = batch["caption/tensor"][b]
        ref_in = t[~batch["caption/input_mask"][b]]
        ref_tgt = t[~batch["caption/target_mask"][b]]
        kept_ids = set(ref_in[~sp.is_sentinel(ref_in)].tolist())
        kept = np.array([v in kept_ids for v in tokens])
        inp, tgt = spans.span_mask(tokens, np.arange(len(tokens)), kept, sp, empty_input=len(ref_in) == 0)
        assert inp.tolist() == ref_in.tolist() and tgt.tolist() == ref_tgt.tolist()
        # Decoder: T target tokens -> T-1 predictions, tensor[i] predicts tensor[i+1].
        valid = expected["target_valid/caption"][b]
        assert expected["target_ids/caption"][b][valid].tolist() == tgt[1:].tolist()


def test_ml4m_modalities_on_fixture_data(ml4m_batch):
    batch, _ = ml4m_batch
    mods = modalities.resolve(["rgb@224", "tok_rgb@224", "tok_depth@224", "caption"], family="ml4m")
    alphas = {"rgb@224": dict(input_alphas=[1000.0, 0.5], target_alphas=[0.0, 0.0]),
              "tok_rgb@224": dict(input_alphas=[0.0, 0.5], target_alphas=[0.5, 0.5]),
              "tok_depth@224": dict(input_alphas=[0.0, 0.5], target_alphas=[0.5, 0.5]),
              "caption": dict(input_alphas=[0.0, 0.5], target_alphas=[0.5, 0.5], keep=["random", "random"])}
    assert all(m.text == ML4M for m in mods if m.kind == "sequence")  # carried by the modality
    t = MaskingTransform(mods, 128, 128, alphas)
    outs = []
    for b in range(2):
        raw = batch["raw/caption_ids"][b]
        sample = {"rgb@224": batch["raw/rgb_uint8"][b], "tok_rgb@224": batch["raw/tok_rgb@224"][b],
                  "tok_depth@224": batch["raw/tok_depth@224"][b], "caption": raw[(raw >= 0) & (raw != 3)]}
        for seed in range(10):
            out = t(sample, np.random.default_rng(seed))
            assert out["enc_valid"].all() and out["dec_valid"].all()  # 196-token grids: always fillable
            outs.append(out)
        # ml-4m's RGBTransform (ImageNet mean/std) on the same uint8 image, CHW there, HWC here.
        np.testing.assert_allclose(outs[-1][PIXELS_PREFIX + "rgb@224"],
                                   batch["rgb@224/tensor"][b].transpose(1, 2, 0), atol=1e-5)
    stacked = collate(outs)
    assert stacked["enc_ids"].shape == (20, 128) and stacked["pixels/rgb@224"].shape == (20, 224, 224, 3)


# ------------------------------------------------------------------------------------------------
# grain and config
# ------------------------------------------------------------------------------------------------
def test_grain_random_map_is_deterministic():
    import grain

    t = MaskingTransform(modalities.resolve(["tok_rgb@64", "tok_depth@64", "caption"]), 48, 48)
    rng = np.random.default_rng(0)
    data = [{"tok_rgb@64": rng.integers(0, 1024, (8, 8)), "tok_depth@64": rng.integers(0, 1024, (8, 8)),
             "caption": rng.integers(300, 4096, 12)} for _ in range(6)]

    def run(seed):
        ds = grain.MapDataset.source(data).random_map(GrainMasking(t), seed=seed)
        return [ds[i] for i in range(len(data))]

    a, b, c = run(3), run(3), run(4)
    # grain worker processes receive the transform pickled: it must survive the round trip.
    t2 = pickle.loads(pickle.dumps(t))
    again = t2(data[0], np.random.default_rng(5))
    assert all(np.array_equal(again[k], v) for k, v in t(data[0], np.random.default_rng(5)).items())
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(np.array_equal(x["enc_pos"], y["enc_pos"]) for x, y in zip(a, c))


def test_from_config():
    cfg = default_config()
    t = MaskingTransform.from_config(cfg, modalities.resolve(["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]))
    assert (t.input_budget, t.target_budget) == (64, 64) and len(t.components) == 2
    cfg.weights = ("3", "1")  # what a --config.masking.weights=3,1 override produces
    t = MaskingTransform.from_config(cfg, modalities.resolve(["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]))
    np.testing.assert_allclose(t._cum_w, [0.75, 1.0])
    cfg.alphas = {"tok_rgb@64": dict(input_alphas=[1.0], target_alphas=[0.0]),
                  "tok_depth@64": dict(input_alphas=[0.0], target_alphas=[1.0])}
    cfg.weights = ()
    t = MaskingTransform.from_config(cfg, modalities.resolve(["tok_rgb@64", "tok_depth@64"]))
    assert len(t.components) == 1 and t.components[0].input_alphas == (1.0, 0.0)


# ------------------------------------------------------------------------------------------------
# bad input: clear errors naming the modality and field
# ------------------------------------------------------------------------------------------------
SCENE = ["rgb@64", "tok_rgb@64", "caption"]


def scene_sample():
    return {"rgb@64": np.zeros((64, 64, 3), np.uint8), "tok_rgb@64": np.zeros((8, 8), np.int32),
            "caption": np.arange(300, 310)}


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.pop("caption"), r"missing modalities \['caption'\]"),
    (lambda s: s.update(extra=np.zeros(3)), r"unknown modalities \['extra'\]"),
    (lambda s: s.update({"tok_rgb@64": np.full((8, 8), 1024)}), r"tok_rgb@64: token id 1024 .*\[0, 1024\)"),
    (lambda s: s.update({"tok_rgb@64": np.zeros((8, 7), int)}), r"tok_rgb@64: token grid must have shape \(8, 8\)"),
    (lambda s: s.update({"tok_rgb@64": np.zeros((8, 8))}), r"tok_rgb@64: token ids must be integers"),
    (lambda s: s.update({"rgb@64": np.zeros((32, 32, 3), np.uint8)}), r"rgb@64: pixels must have shape"),
    (lambda s: s.update({"rgb@64": np.zeros((64, 64, 3), np.int64)}), r"rgb@64: pixels must be uint8"),
    (lambda s: s.update(caption=np.array([300, 5000])), r"caption: ids contain id 5000 outside"),
    (lambda s: s.update(caption=np.array([300, 3])), r"caption: ids\[1\] = 3 is a special id"),
    (lambda s: s.update(caption=np.zeros((2, 3), int)), r"caption: ids must be a 1-D id array"),
])
def test_bad_samples(mutate, match):
    t = MaskingTransform(modalities.resolve(SCENE), 32, 32)
    s = scene_sample()
    mutate(s)
    with pytest.raises(MaskingInputError, match=match):
        t(s, np.random.default_rng(0))


def test_bad_configs():
    mods = modalities.resolve(SCENE)
    with pytest.raises(KeyError, match="unknown modality 'tok_nope@64'"):
        modalities.resolve(["tok_nope@64"])
    with pytest.raises(ValueError, match=r"'rgb2all' can place at most 64 input tokens .*input_budget is 100"):
        MaskingTransform(mods, 100, 32)
    with pytest.raises(ValueError, match=r"'rgb@64' \(pixels\) cannot be a target"):
        MaskingTransform(mods, 32, 32, {n: dict(input_alphas=[1.0], target_alphas=[1.0]) for n in SCENE})
    with pytest.raises(ValueError, match=r"lack modalities \['caption'\]"):
        MaskingTransform(mods, 32, 32, {n: dict(input_alphas=[1.0], target_alphas=[0.0]) for n in SCENE[:2]})
    with pytest.raises(ValueError, match=r"one entry per mixture component"):
        MaskingTransform(mods, 32, 32, {"rgb@64": dict(input_alphas=[1.0, 1.0], target_alphas=[0.0, 0.0]),
                                        "tok_rgb@64": dict(input_alphas=[1.0], target_alphas=[1.0]),
                                        "caption": dict(input_alphas=[1.0], target_alphas=[1.0])})
    with pytest.raises(ValueError, match=r"both input_only and target_only: \['caption'\]"):
        MaskingTransform(mods, 32, 32, input_only=["caption"], target_only=["caption"])
    with pytest.raises(ValueError, match=r"'caption' \(max_length 64\) can need sentinel \[S_33\]"):
        MaskingTransform([dataclasses.replace(m, text=TextLayout(num_sentinels=20)) for m in mods], 32, 32)
    with pytest.raises(ValueError, match="mixture preset 'some2all' needs an input modality named or sourced 'some'"):
        MaskingTransform(mods, 32, 32, "all2all,some2all")
    meta = modalities.resolve(["tok_rgb@64", "metadata"])
    t = MaskingTransform(meta, 32, 32, "all2all")
    with pytest.raises(MaskingInputError, match="metadata: chunk masking of a flat id array needs chunk_start_range"):
        t({"tok_rgb@64": np.zeros(64, int), "metadata": np.arange(300, 306)}, np.random.default_rng(0))
    # The same data as a list of chunks works without a range.
    t({"tok_rgb@64": np.zeros(64, int), "metadata": [np.array([300, 301]), np.array([302, 303])]},
      np.random.default_rng(0))
