"""Sampler invariants against small fake models (no fourm model needed).

Pins: schedules (4M's numbers, sums, bad step counts); MaskGIT/ROAR commit exactly the scheduled
number of tokens per step, never touch given tokens, are deterministic when greedy or seeded;
top-k/top-p semantics; guidance arithmetic; KV-cache decoding equals re-running the full decoder;
stop tokens; span merging.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourm.generate import autoregressive as ar
from fourm.generate import maskgit, schedules, stepwise
from fourm.generate.sampling import Filter, filter_logits, guide, sample_tokens
from fourm.text_layout import TextLayout, merge_spans

B, N, V = 3, 24, 13
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- schedules
def test_cosine_schedule_matches_reference_numbers():
    np.testing.assert_array_equal(schedules.cosine_schedule(8, 196), [7, 21, 32, 38, 38, 32, 21, 7])
    np.testing.assert_array_equal(schedules.cosine_schedule(1, 196), [196])


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps,total", [(1, 1), (3, 5), (8, 64), (12, 12), (25, 196)])
def test_token_schedules_sum_and_never_empty(name, steps, total):
    c = schedules.token_schedule(name, steps, total)
    assert len(c) == steps and c.sum() == total and (c >= 1).all()


def test_constant_schedule_and_errors():
    np.testing.assert_array_equal(schedules.constant_schedule(30, 100), [30, 30, 30, 10])
    with pytest.raises(ValueError, match="9 steps for only 8 tokens"):
        schedules.cosine_schedule(9, 8)
    with pytest.raises(ValueError, match="unknown token schedule"):
        schedules.token_schedule("exp", 2, 8)
    with pytest.raises(ValueError, match="onex"):
        schedules.temperature_schedule("onex:1", 1.0, [4, 4])


def test_temperature_and_guidance_schedules():
    counts = schedules.cosine_schedule(8, 196)
    lin = schedules.temperature_schedule("linear", 2.0, counts)
    assert lin[0] == pytest.approx(2.0) and np.all(np.diff(lin) < 0) and lin[-1] > 0
    assert np.all(schedules.temperature_schedule("constant", 0.0, counts) == 0)
    g = schedules.guidance_schedule([3.0, -1.0], 5, "cosine")
    np.testing.assert_allclose(g[0], [3.0, -1.0]) and np.testing.assert_allclose(g[-1], [1.0, 1.0])


# --------------------------------------------------------------------------- fake grid model
def fake_grid_model(seed=0, groups=0):
    """Logits depend on position and on the known tokens (through a pooled embedding), so the
    decoding order matters; optional group axis for guidance tests."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    pos = jax.random.normal(k[0], (N, V))
    emb = jax.random.normal(k[1], (V, V))
    gshift = jax.random.normal(k[2], (max(groups, 1), 1, 1, V))

    def logits_fn(tokens, known, query):
        pooled = jnp.sum(jnp.where(known[..., None], emb[tokens], 0.0), 1) / N  # [B,V]
        out = pos[None] + 2.0 * pooled[:, None, :]
        out = jnp.where(query[..., None], out, jnp.nan)  # non-queried rows must never be used
        return out if groups == 0 else out[None] + gshift

    def compact_logits_fn(tokens, known, query, sizes):
        # Only the queried rows (as the model's exact-shape path returns them).
        qpos = jnp.argsort(~query, axis=-1, stable=True)[:, :sizes[1]]
        return jnp.take_along_axis(logits_fn(tokens, known, query), qpos[..., None], axis=-2), qpos

    return logits_fn, compact_logits_fn


_FAKE, _FAKE_COMPACT = fake_grid_model()


@functools.partial(jax.jit, static_argnames=("scheme",), compiler_options=FAST)
def _decode_jit(tokens, known, rng, counts, temps, commit_step, scheme):
    # One compiled sampler per (scheme, forced order or not, number of steps), shared by tests.
    return maskgit.iterative_decode(_FAKE, tokens, known, rng, counts, temps, scheme=scheme,
                                    commit_step=commit_step, return_trace=True)


def _decode(scheme, counts, temps, known=None, seed=0, commit_step=None):
    known = np.zeros((B, N), bool) if known is None else known
    tokens = np.where(known, 7, 0).astype(np.int32)
    counts = np.broadcast_to(np.asarray(counts, np.int32), (B, np.shape(counts)[-1]))
    return _decode_jit(tokens, known, jax.random.PRNGKey(seed), counts,
                       np.asarray(temps, np.float32), commit_step, scheme=scheme)


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_tokens_per_step_follow_schedule(scheme, temp):
    counts = schedules.cosine_schedule(4, N)
    res = _decode(scheme, counts, np.full(4, temp, np.float32))
    ds = np.asarray(res.decode_step)
    per_step = np.stack([(ds == s).sum(-1) for s in range(4)], -1)
    np.testing.assert_array_equal(per_step, np.broadcast_to(counts, (B, 4)))
    queried = (np.asarray(res.trace_ids) >= 0).sum(-1).T  # [B,S]
    if scheme == "maskgit":  # every still-unknown position is a query
        np.testing.assert_array_equal(queried, np.broadcast_to(
            N - np.concatenate([[0], np.cumsum(counts)[:-1]]), (B, 4)))
    else:  # ROAR queries only the chunk it commits, and accepts all of it
        np.testing.assert_array_equal(queried, np.broadcast_to(counts, (B, 4)))
    assert np.all(np.asarray(res.tokens) >= 0) and np.all(np.asarray(res.tokens) < V)


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_unrolled_exact_shapes_equal_scan(scheme):
    known = np.zeros((B, N), bool)
    known[:, :4] = True
    counts = schedules.cosine_schedule(4, N - 4)
    ref = _decode(scheme, counts, np.full(4, 2.0, np.float32), known=known, seed=9)
    unrolled = jax.jit(lambda t, k, r, te: maskgit.iterative_decode(
        _FAKE, t, k, r, counts, te, scheme=scheme, return_trace=True, num_known=4,
        compact_logits_fn=_FAKE_COMPACT),
        compiler_options=FAST)
    got = unrolled(np.where(known, 7, 0), known, jax.random.PRNGKey(9), np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(got.tokens, ref.tokens)  # same noise per (sample, position)
    np.testing.assert_array_equal(got.decode_step, ref.decode_step)
    np.testing.assert_allclose(got.trace_logp, ref.trace_logp, atol=1e-5)


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_bucketed_steps_equal_scan_with_few_programs(scheme):
    # Samples with different numbers of given tokens (per-sample schedules), sampled (temp 2),
    # choice noise off: the host loop over bucketed step programs draws what the scan draws.
    rng = np.random.default_rng(1)
    known = rng.random((B, N)) < np.array([0.0, 0.2, 0.5])[:, None]
    counts = schedules.per_sample_counts("cosine", 4, (~known).sum(-1))
    temps = np.full(4, 2.0, np.float32)
    ref = _decode(scheme, counts, temps, known=known, seed=4)
    step = stepwise.jit_step(_FAKE_COMPACT, scheme=scheme, return_trace=True, compiler_options=FAST)
    got = stepwise.bucketed_decode(step, np.where(known, 7, 0), known, jax.random.PRNGKey(4),
                                   counts, temps, scheme=scheme, return_trace=True, buckets=3)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.decode_step, ref.decode_step)
    np.testing.assert_array_equal(got.trace_ids, ref.trace_ids)
    np.testing.assert_allclose(got.trace_logp, ref.trace_logp, atol=1e-5)
    sizes = stepwise.step_sizes(known, counts, scheme, 3)
    assert step._cache_size() == len(set(sizes)) <= 3  # one program per run of steps, not per step


def test_bucket_sizes():
    assert [stepwise.bucket(x, 256, 4) for x in (0, 1, 64, 65, 200, 256)] == [64, 64, 64, 128, 256, 256]
    assert stepwise.bucket(5, 10, 3) == 8 and stepwise.bucket(9, 10, 3) == 10  # capped at total
    assert [stepwise.bucket(x, 196) for x in (0, 7, 8, 190)] == [7, 7, 14, 196]  # grid of ceil(196/32)
    # MaskGIT-8 cosine on 256 tokens (grid 8): known slots grow, query slots shrink; 4 programs,
    # not 8, each run of steps at its own largest sizes.
    counts = schedules.cosine_schedule(8, 256)
    exact = stepwise.step_sizes(np.zeros((1, 256), bool), counts, "maskgit", 8)
    done = np.cumsum(counts) - counts
    assert exact == [(stepwise.bucket(d, 256), stepwise.bucket(256 - d, 256)) for d in done]
    sizes = stepwise.step_sizes(np.zeros((1, 256), bool), counts, "maskgit", 4)
    assert sizes[0][1] == 256 and len(set(sizes)) == 4
    assert all(k >= ek and q >= eq for (k, q), (ek, eq) in zip(sizes, exact))


def _slots(sizes):
    return sum(k + q for k, q in sizes)


def test_split_steps_is_the_fewest_padded_slots():
    # Against every way to cut the steps into at most P runs of consecutive steps.
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(200):
        s, p = int(rng.integers(1, 8)), int(rng.integers(1, 5))
        sizes = [tuple(int(v) for v in rng.integers(1, 40, 2)) for _ in range(s)]
        got = stepwise.split_steps(sizes, p)
        assert len(got) == s and all(g[0] >= a and g[1] >= b for g, (a, b) in zip(got, sizes))
        runs = 1 + sum(a != b for a, b in zip(got, got[1:]))
        assert runs <= p
        best = min(sum(_slots([(max(k for k, _ in sizes[a:e]), max(q for _, q in sizes[a:e]))]) * (e - a)
                       for a, e in zip((0, *cut), (*cut, s)))
                   for r in range(min(p, s)) for cut in itertools.combinations(range(1, s), r))
        assert _slots(got) == best
    assert stepwise.split_steps([], 3) == []
    assert stepwise.split_steps([(1, 9), (5, 5), (9, 1)], 1) == [(9, 9)] * 3


def test_maskgit_commits_most_confident():
    res = _decode("maskgit", [4, 6, 6, N - 16], np.zeros(4))
    lp0 = np.asarray(res.trace_logp[0])
    ds = np.asarray(res.decode_step)
    for b in range(B):
        committed = lp0[b][ds[b] == 0]
        assert committed.min() >= np.sort(lp0[b])[::-1][3] - 1e-6


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_known_tokens_never_change(scheme):
    rng = np.random.default_rng(0)
    known = rng.random((B, N)) < 0.4
    known[:, 0] = True
    unknown = (~known).sum(-1)
    counts = schedules.per_sample_counts("linear", 4, unknown)
    res = _decode(scheme, counts, np.ones(4, np.float32), known=known)
    toks = np.asarray(res.tokens)
    assert np.all(toks[known] == 7)
    assert np.all(np.asarray(res.decode_step)[known] == -1)
    assert np.all(np.asarray(res.decode_step)[~known] >= 0)
    assert np.all(np.asarray(res.trace_ids)[:, known] == -1)  # given positions are never queried


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_greedy_is_deterministic_and_seeded_sampling_repeats(scheme):
    counts = schedules.cosine_schedule(4, N)
    g1 = _decode(scheme, counts, np.zeros(4, np.float32), seed=1)
    g2 = _decode(scheme, counts, np.zeros(4, np.float32), seed=1)
    np.testing.assert_array_equal(g1.tokens, g2.tokens)
    if scheme == "maskgit":  # greedy MaskGIT consumes no randomness at all
        g3 = _decode(scheme, counts, np.zeros(4, np.float32), seed=2)
        np.testing.assert_array_equal(g1.tokens, g3.tokens)
        np.testing.assert_array_equal(g1.decode_step, g3.decode_step)
    s1 = _decode(scheme, counts, np.full(4, 3.0, np.float32), seed=5)
    s2 = _decode(scheme, counts, np.full(4, 3.0, np.float32), seed=5)
    s3 = _decode(scheme, counts, np.full(4, 3.0, np.float32), seed=6)
    np.testing.assert_array_equal(s1.tokens, s2.tokens)
    assert not np.array_equal(np.asarray(s1.tokens), np.asarray(s3.tokens))


def test_forced_commit_order_is_replayed():
    rng = np.random.default_rng(3)
    counts = np.array([5, 9, 4, 6])
    forced = np.stack([rng.permutation(np.repeat(np.arange(4), counts)) for _ in range(B)])
    maskgit.check_commit_step(forced, np.zeros((B, N), bool), counts)
    res = _decode("maskgit", counts, np.zeros(4, np.float32), commit_step=jnp.asarray(forced))
    np.testing.assert_array_equal(res.decode_step, forced)
    with pytest.raises(ValueError, match="commits"):
        maskgit.check_commit_step(forced, np.zeros((B, N), bool), np.array([6, 8, 4, 6]))


def test_guided_grid_decoding_uses_combined_logits():
    fn, _ = fake_grid_model(groups=3)
    known = jnp.zeros((B, N), bool)
    w = jnp.array([[2.0, -0.5]])
    res = maskgit.iterative_decode(fn, jnp.zeros((B, N), jnp.int32), known, jax.random.PRNGKey(0),
                                   jnp.array([N]), jnp.zeros(1), w)
    expected = jnp.argmax(guide(fn(jnp.zeros((B, N), jnp.int32), known, ~known), w[0]), -1)
    np.testing.assert_array_equal(res.tokens, expected)


# --------------------------------------------------------------------------- sampling / guidance
def test_top_k_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda f: np.isfinite(np.asarray(filter_logits(logits, f)))[0].tolist()  # noqa: E731
    assert keep(Filter(top_k=2)) == [True, True, False, False, False]
    assert keep(Filter(top_p=0.45)) == [True, False, False, False, False]
    assert keep(Filter(top_p=0.6)) == [True, True, False, False, False]  # first to cross p kept
    assert keep(Filter(top_p=0.01)) == [True, False, False, False, False]  # never empty
    assert keep(Filter(top_p=1.0)) == [True] * 5
    assert keep(Filter(top_k=0.4)) == [True, True, False, False, False]  # fraction of vocab
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p must be in"):
            Filter(top_p=bad)
    with pytest.raises(ValueError, match="top_k"):
        Filter(top_k=-1)


def test_sampling_respects_filters_and_temperature():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4000, V))
    ids, _ = sample_tokens(logits, jax.random.PRNGKey(1), 5.0, Filter(top_k=1))
    np.testing.assert_array_equal(ids, jnp.argmax(logits, -1))  # top-1 sampling is greedy
    ids, lp = sample_tokens(logits, jax.random.PRNGKey(1), 1.0, Filter(top_k=3))
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert np.all((np.asarray(ids)[:, None] == top3).any(-1))
    assert np.all(np.asarray(lp) <= 0)
    g_ids, g_lp = sample_tokens(logits, jax.random.PRNGKey(9), 0.0)
    np.testing.assert_array_equal(g_ids, jnp.argmax(logits, -1))
    np.testing.assert_allclose(g_lp, jnp.max(jax.nn.log_softmax(logits), -1), atol=1e-6)


def test_inverse_cdf_sampling_distribution():
    from fourm.generate.sampling import inverse_cdf_sample

    probs = np.array([0.1, 0.0, 0.3, 0.05, 0.25, 0.0, 0.3])
    n = 100_000
    u = jax.random.uniform(jax.random.PRNGKey(3), (n,))
    ids, lp = inverse_cdf_sample(jnp.broadcast_to(jnp.log(probs), (n, 7)), u, block=2)
    np.testing.assert_allclose(np.bincount(np.asarray(ids), minlength=7) / n, probs, atol=0.006)
    np.testing.assert_allclose(lp, np.log(probs[np.asarray(ids)]), atol=1e-5)
    edge, _ = inverse_cdf_sample(jnp.log(jnp.asarray(probs))[None].repeat(2, 0), jnp.array([0.0, 1.0]))
    assert edge.tolist() == [0, 6]  # the ends never land on a zero-probability id


def test_guidance_arithmetic():
    u, c1, c2 = (jax.random.normal(k, (2, V)) for k in jax.random.split(jax.random.PRNGKey(0), 3))
    stack = jnp.stack([u, c1])
    np.testing.assert_allclose(guide(stack, jnp.array([1.0])), c1, atol=1e-6)  # scale 1 = cond
    np.testing.assert_allclose(guide(stack, jnp.array([0.0])), u, atol=1e-6)  # scale 0 = uncond
    np.testing.assert_allclose(guide(stack, jnp.array([3.0])), u + 3 * (c1 - u), atol=1e-5)
    got = guide(jnp.stack([u, c1, c2]), jnp.array([2.0, -1.5]))
    np.testing.assert_allclose(got, u + 2 * (c1 - u) - 1.5 * (c2 - u), atol=1e-5)
    np.testing.assert_allclose(guide(u[None], jnp.zeros((0,))), u)
    with pytest.raises(ValueError, match="weights"):
        guide(jnp.stack([u, c1, c2]), jnp.array([1.0]))


# --------------------------------------------------------------------------- autoregressive
T, D, EOS, STOP = 9, 8, 3, 6


def fake_causal_model(seed=0, batch=B, groups=0):
    """One causal self-attention layer + a context vector per sample: a KV-cache step and the
    equivalent full pass."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    E, P = jax.random.normal(ks[0], (V, D)), jax.random.normal(ks[1], (T, D))
    Wq, Wk, Wv = (jax.random.normal(k, (D, D)) / np.sqrt(D) for k in ks[2:5])
    U = jax.random.normal(ks[5], (D, V))
    G = max(groups, 1)
    ctx = jax.random.normal(ks[6], (G, batch, D))

    def head(h, g):
        return (h + ctx[g][:, None, :]) @ U

    def full(ids):  # [B,T] -> [(G,)B,T,V]
        x = E[ids] + P[None]
        s = jnp.einsum("bid,bjd->bij", x @ Wq, x @ Wk) / np.sqrt(D)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        h = x + jnp.einsum("bij,bjd->bid", jax.nn.softmax(s, -1), x @ Wv)
        out = jnp.stack([head(h, g) for g in range(G)])
        return out if groups else out[0]

    def step(cache, tok, pos):
        kc, vc = cache
        x = E[tok] + P[pos]  # [B,D]
        kc, vc = kc.at[:, pos].set(x @ Wk), vc.at[:, pos].set(x @ Wv)
        s = jnp.einsum("bd,btd->bt", x @ Wq, kc) / np.sqrt(D)
        s = jnp.where(jnp.arange(T)[None] <= pos, s, -jnp.inf)
        h = x + jnp.einsum("bt,btd->bd", jax.nn.softmax(s, -1), vc)
        out = jnp.stack([head(h[:, None], g)[:, 0] for g in range(G)])
        return (out if groups else out[0]), (kc, vc)

    cache = (jnp.zeros((batch, T, D)), jnp.zeros((batch, T, D)))
    return step, cache, full


@pytest.mark.parametrize("temp,groups", [(0.0, 0), (1.5, 2)])
def test_kv_cache_equals_no_cache(temp, groups):
    step, cache, full = fake_causal_model(groups=groups)
    nc_step, nc_cache = ar.no_cache_step(full, B, T)
    g = jnp.array([1.7]) if groups else None
    run = lambda s, c: ar.autoregressive_decode(  # noqa: E731
        s, c, jnp.full((B,), 5), jax.random.PRNGKey(3), max_new_tokens=T,
        temperatures=temp, guidance=g)
    fast = functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
    a, b = fast(run)(step, cache), fast(run)(nc_step, nc_cache)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


def test_autoregressive_stops_and_pads():
    step, cache, full = fake_causal_model(seed=1)
    # Pick as stop token whatever greedy emits first for sample 0: it must stop right away.
    first = ar.autoregressive_decode(step, cache, jnp.full((B,), 5), jax.random.PRNGKey(0),
                                     max_new_tokens=T)
    stop_tok = int(first.tokens[0, 0])
    res = ar.autoregressive_decode(step, cache, jnp.full((B,), 5), jax.random.PRNGKey(0),
                                   max_new_tokens=T, stop_ids=(stop_tok,), pad_id=0)
    toks = np.asarray(res.tokens)
    assert bool(res.stopped[0]) and int(res.length[0]) == 1
    for b in range(B):
        n = int(res.length[b])
        if bool(res.stopped[b]):
            assert toks[b, n - 1] == stop_tok and stop_tok not in toks[b, : n - 1]
            assert np.all(toks[b, n:] == 0)
        else:
            assert n == T and stop_tok not in toks[b]
        np.testing.assert_array_equal(toks[b, :n], np.asarray(first.tokens)[b, :n])


def test_merge_spans():
    lay = TextLayout(num_sentinels=4)  # [S_0] .. [S_3] = 4 .. 7
    S1, S2, S3 = 5, 6, 7
    assert merge_spans([S1], [S1, 10, 11, S2], lay) == [10, 11]
    assert merge_spans([20, S1, 21, S2], [S1, 10, S2, 12, 13, S3], lay) == [20, 10, 21, 12, 13]
    assert merge_spans([S1, 22], [S1, 10, EOS, S2], lay, drop_ids=[EOS]) == [10, 22]
    assert merge_spans([S1, S2], [S1, 10], lay) == [10]  # a span never generated is empty
    assert merge_spans([], [S1, 10, 11, S2], lay) == [10, 11]  # no input: the text is [S_1]'s span
