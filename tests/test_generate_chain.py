"""Chained generation on a small random FourM, and the ml-4m generation parity fixture.

Pins: shapes and determinism of the chain; the unrolled (exact-shape) MaskGIT equals the lax.scan
one; KV-cache text decoding equals re-running the decoder; guidance group arithmetic on the real
model; partly given targets keep their tokens; bad inputs give clear errors; and token-for-token
agreement with 4M's greedy generation (README section 5 of the fixture).
"""

import dataclasses
import functools

import numpy as np
import pytest

from fourm import modalities as modreg
from fourm.generate import chain
from fourm.generate.chain import GenerationInputError, Generator, Partial, Target
from fourm.generate.inputs import prepare_pixels
from fourm.text_layout import TextLayout

MODS = ["rgb@64", "tok_depth@64", "caption"]
# Tests compile many small programs; XLA's optimisation passes would dominate their run time.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B = 2


@pytest.fixture(scope="module")
def model():
    return small_model()


@functools.lru_cache(maxsize=None)
def small_model():
    """The small random model of the generation tests, shared with test_generate_cli (so its
    compiled stages are reused within a process). Weights come from NumPy on the abstract model:
    the model's own initialisation compiles a random generator per parameter shape (~1 s each)."""
    import jax
    from flax import nnx

    from fourm.model import build_model

    mods = modreg.resolve(MODS, vocab_overrides={"tok_depth@64": 64, "caption": 1024})
    cfg = dict(dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, mods, seed=0)))
    rng = np.random.default_rng(0)

    def init(path, x):
        is_scale = str(path[-2] if len(path) > 1 else "").endswith("scale") or "scale" in str(path)
        w = rng.normal(0.0, 0.3, x.shape)
        return (1.0 + 0.1 * w if is_scale else w).astype(x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (B, 64, 64, 3), dtype=np.uint8)


DEPTH = Target("tok_depth@64", steps=3, temperature=1.0)
CAPTION = Target("caption", max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def scan_run(model, image):
    gen = Generator(model, loop="scan", compiler_options=FAST)
    return gen, gen.generate({"rgb@64": image}, [DEPTH, CAPTION], seed=3, return_trace=True)


def test_chain_shapes_determinism_and_schedule(model, image, scan_run):
    gen, out = scan_run
    d = out.tokens["tok_depth@64"]
    assert d.shape == (B, 8, 8) and d.dtype == np.int32 and d.min() >= 0 and d.max() < 64
    np.testing.assert_array_equal(out.trace["tok_depth@64"]["num_tokens_per_step"], [[16, 32, 16]] * B)
    steps = out.trace["tok_depth@64"]["decode_step"]
    assert [(steps == s).sum() for s in range(3)] == [16 * B, 32 * B, 16 * B]
    cap = out.trace["caption"]
    assert cap["generated"].shape == (B, 6) and np.all(cap["length"] <= 6)
    again = gen.generate({"rgb@64": image}, [DEPTH, CAPTION], seed=3)
    np.testing.assert_array_equal(again.tokens["tok_depth@64"], d)
    np.testing.assert_array_equal(again.tokens["caption"], out.tokens["caption"])
    other = gen.generate({"rgb@64": image}, [DEPTH], seed=4)
    assert not np.array_equal(other.tokens["tok_depth@64"], d)  # sampled, so the seed matters


def test_unrolled_equals_scan_and_kv_cache_equals_no_cache(model, image, scan_run):
    _, ref = scan_run
    fast = Generator(model, loop="unrolled", compiler_options=FAST)
    out = fast.generate({"rgb@64": image}, [DEPTH], seed=3, return_trace=True)
    np.testing.assert_array_equal(out.tokens["tok_depth@64"], ref.tokens["tok_depth@64"])
    np.testing.assert_allclose(out.trace["tok_depth@64"]["step_logp"],
                               ref.trace["tok_depth@64"]["step_logp"], atol=1e-4)
    # The default loop: bucketed step programs (2 for the 3 steps),
    # samples with different numbers of given tokens, shared programs across calls.
    bucketed = Generator(model, buckets=2, compiler_options=FAST)
    # The step programs are shared process-wide (other tests may have compiled some): count new ones.
    before = bucketed._step_fn._cache_size()
    got = bucketed.generate({"rgb@64": image}, [DEPTH], seed=3, return_trace=True)
    np.testing.assert_array_equal(got.tokens["tok_depth@64"], ref.tokens["tok_depth@64"])
    np.testing.assert_array_equal(got.trace["tok_depth@64"]["step_ids"],
                                  ref.trace["tok_depth@64"]["step_ids"])
    programs = bucketed._step_fn._cache_size()
    assert programs - before <= 2  # 3 steps of 16, 32, 16 tokens in 2 runs
    again = Generator(model, buckets=2, compiler_options=FAST)
    again.generate({"rgb@64": image}, [DEPTH], seed=4, return_trace=True)
    assert bucketed._step_fn._cache_size() == programs  # another Generator and call: no new program
    partial = Partial(ref.tokens["tok_depth@64"], np.arange(64).reshape(1, 8, 8) < [[[5]], [[40]]])
    a = bucketed.generate({"rgb@64": image, "tok_depth@64": partial}, [DEPTH], seed=1)
    b = Generator(model, loop="scan", compiler_options=FAST).generate(
        {"rgb@64": image, "tok_depth@64": partial}, [DEPTH], seed=1)
    np.testing.assert_array_equal(a.tokens["tok_depth@64"], b.tokens["tok_depth@64"])
    slow = Generator(model, loop="scan", kv_cache=False, compiler_options=FAST)
    cond = {"rgb@64": image, "tok_depth@64": ref.tokens["tok_depth@64"]}
    a = slow.generate(cond, [CAPTION], seed=3)
    b = Generator(model, loop="scan", compiler_options=FAST).generate(cond, [CAPTION], seed=3)
    np.testing.assert_array_equal(a.trace["caption"]["generated"], b.trace["caption"]["generated"])
    np.testing.assert_array_equal(a.trace["caption"]["generated"], ref.trace["caption"]["generated"])
    np.testing.assert_allclose(a.trace["caption"]["step_logp"], b.trace["caption"]["step_logp"], atol=1e-4)


def test_guidance_groups_on_the_model(model, image):
    gen = Generator(model, loop="scan", compiler_options=FAST)
    greedy = dataclasses.replace(DEPTH, temperature=0.0)  # temperatures are data: no recompile
    plain = gen.generate({"rgb@64": image}, [greedy]).tokens["tok_depth@64"]
    uncond = gen.generate({}, [greedy], batch_size=B).tokens["tok_depth@64"]
    # Weight 1 on the only condition = the conditional logits; weight 0 = conditions removed.
    w1 = gen.generate({"rgb@64": image}, [dataclasses.replace(greedy, guidance={"rgb@64": 1.0})])
    w0 = gen.generate({"rgb@64": image}, [dataclasses.replace(greedy, guidance={"rgb@64": 0.0})])
    np.testing.assert_array_equal(w1.tokens["tok_depth@64"], plain)
    np.testing.assert_array_equal(w0.tokens["tok_depth@64"], uncond)
    cfg = gen.generate({"rgb@64": image}, [dataclasses.replace(greedy, guidance_scale=3.0)])
    assert cfg.tokens["tok_depth@64"].shape == (B, 8, 8)


def test_partly_given_targets_keep_their_tokens(model, image):
    gen = Generator(model, loop="scan", compiler_options=FAST)
    given = np.arange(64, dtype=np.int32).reshape(8, 8) % 64
    known = np.zeros((8, 8), bool)
    known[:3] = True
    out = gen.generate({"rgb@64": image, "tok_depth@64": Partial(given, known)},
                       [DEPTH], seed=0)
    np.testing.assert_array_equal(out.tokens["tok_depth@64"][:, known], np.broadcast_to(given[known], (B, 24)))
    assert np.all(out.trace["tok_depth@64"]["decode_step"][:, known.reshape(-1)] == -1)
    # A caption given with a sentinel: only its span is generated; the rest is kept around it.
    ids = TextLayout()
    cap = gen.generate({"caption": np.array([150, 151, ids.sentinel(1), 152])},
                       [CAPTION], batch_size=B)
    gen_ids = cap.trace["caption"]
    for b in range(B):
        span = [t for t in gen_ids["generated"][b, :gen_ids["length"][b]] if t not in (ids.eos_id, 6)]
        assert gen_ids["merged"][b][:2] == [150, 151] and gen_ids["merged"][b][-1] == 152
        assert gen_ids["merged"][b][2:-1] == span


class _FakeImageTokenizer:
    kind = "grid"
    name, grid, vocab_size = "tok_depth@64", (8, 8), 1024


def test_bad_inputs_give_clear_errors(model, image):
    gen = Generator(model)
    with pytest.raises(GenerationInputError, match="unknown target modality 'tok_rgb@64'"):
        gen.generate({"rgb@64": image}, ["tok_rgb@64"])
    with pytest.raises(GenerationInputError, match="unknown condition modality 'depth'"):
        gen.generate({"depth": image}, ["tok_depth@64"])
    with pytest.raises(GenerationInputError, match="also given in full as a condition"):
        gen.generate({"tok_depth@64": np.zeros((8, 8), np.int32)}, ["tok_depth@64"])
    with pytest.raises(ValueError, match="65 steps for only 64 tokens"):
        gen.generate({"rgb@64": image}, [Target("tok_depth@64", steps=65)])
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        gen.generate({"rgb@64": image}, [Target("tok_depth@64", top_p=1.5)])
    with pytest.raises(ValueError, match="top_p must be in"):
        Target("caption", top_p=0.0).filter()
    with pytest.raises(GenerationInputError, match="is not an output of this model"):
        gen.generate({"caption": "x"}, ["rgb@64"])
    with pytest.raises(GenerationInputError, match="token ids outside"):
        gen.generate({"tok_depth@64": np.full((8, 8), 99)}, ["caption"])
    with pytest.raises(GenerationInputError, match="different batch sizes"):
        gen.generate({"rgb@64": image, "tok_depth@64": np.zeros((3, 8, 8), np.int32)}, ["caption"])
    with pytest.raises(GenerationInputError, match="disagree on 'tok_depth@64'.*vocabulary 64.*1024"):
        Generator(model, {"tok_depth@64": _FakeImageTokenizer()})
    with pytest.raises(GenerationInputError, match="guidance names"):
        gen.generate({"rgb@64": image}, [Target("tok_depth@64", guidance={"caption": 2.0})])
    strict = Generator(model, resize=False)
    with pytest.raises(GenerationInputError, match="image is 48x40 .* expects 64x64 .*resizing is off"):
        strict.generate({"rgb@64": np.zeros((40, 48, 3), np.uint8)}, ["tok_depth@64"])
    notices = []
    st = prepare_pixels(model.spec.modality("rgb@64"), np.zeros((40, 48, 3), np.uint8), resize=True,
                        notices=notices)
    assert st.pixels.shape == (1, 64, 64, 3) and "resized" in notices[0]


def test_ml4m_generation_parity(shared_dir):
    fixture = shared_dir / "fixtures" / "ml4m" / "tiny_swiglu"
    if not (fixture / "generation.npz").exists():
        pytest.skip("ml-4m fixture not available")
    from fourm.compat import ml4m
    from fourm.compat.ml4m_generation import check_generation, format_report

    wordpiece = shared_dir / "fixtures" / "ml4m" / "tokenizers" / "wordpiece_text"
    report = check_generation(ml4m.load(fixture), fixture, loop="scan", compiler_options=FAST,
                              text_tokenizer=wordpiece if wordpiece.is_dir() else None)
    assert report["ok"], format_report(report)
    assert report["depth_maskgit8"]["num_predictions"] == 882
    assert report["caption_ar"]["num_generated"] == 20
    if wordpiece.is_dir():  # the generated ids, decoded by 4M's WordPiece as ml-4m printed them
        assert report["caption_ar"]["decoded_text_equal"]


def test_generate_function_api(model, image, scan_run):
    out = chain.generate(model, {"rgb@64": image}, [DEPTH], loop="scan", seed=3,
                         compiler_options=FAST)
    _, ref = scan_run
    np.testing.assert_array_equal(out.tokens["tok_depth@64"], ref.tokens["tok_depth@64"])
    assert out.notices == []
