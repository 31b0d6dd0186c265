"""Chained any-to-any generation: the Python API.

    gen = Generator(model, tokenizers={"tok_depth@64": depth_tok, "caption": text_tok})
    out = gen.generate({"rgb@64": image},
                       ["tok_depth@64", Target("caption", temperature=0.3)], seed=0)
    out.tokens["tok_depth@64"]   # int32 [B, gh, gw]
    out.decoded["tok_depth@64"]  # depth in metres [B, H, W] (through the tokenizer)
    out.text["caption"]          # list of B strings

Conditions: any subset of the model's input modalities, each fully or partly given (see
`fourm.generate.inputs`). Targets are decoded in order, each with its own scheme, schedule,
temperature, top-k/top-p and guidance; each finished target becomes a condition of the next.
Everything is batched over samples and deterministic for a given seed. A grid target runs as a
host loop over jitted step programs at a few bucketed shapes (`fourm.generate.stepwise`), shared
by every step, call and target of the same shapes; a sequence target as one jitted function
(encoder + KV-cached decoding loop), compiled once per shape and setting.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fourm.generate import autoregressive as ar
from fourm.generate import maskgit, model_fns, schedules, stepwise
from fourm.generate.inputs import (GenerationInputError, ModState, Normalised, Partial,
                                   broadcast_states, condition_slots, pack_sequences, prepare_grid,
                                   prepare_pixels, prepare_sequence)
from fourm.generate.sampling import Filter
from fourm.model import decoding
from fourm.text_layout import merge_spans
from fourm.tokenizer_protocol import tokenizer_kind

__all__ = ["Generator", "Generation", "Target", "Partial", "Normalised",
           "GenerationInputError", "generate"]


@dataclasses.dataclass(frozen=True)
class Target:
    """How to generate one target modality.

    scheme: maskgit | roar (grids; default maskgit) or autoregressive (sequences, the only one).
    steps: decoding steps (grids); for token_schedule="constant", tokens per step instead.
    token_schedule: cosine | linear | constant (ROAR defaults to linear, as 4M).
    temperature (+ temperature_schedule constant | linear | cosine | onex:<min>:<power>):
      0 = greedy. top_k / top_p: logit filtering (top_p in (0, 1], None = off).
    guidance_scale: classifier-free guidance against "all conditions removed" (1 = off).
    guidance: multi-modal guidance, a weight per condition name ({"rgb@64": 2, "caption": -1});
      the unconditional pass removes every named condition, pass k keeps condition k only.
    max_new_tokens: sequences, tokens to generate at most (default: the modality's max length - 1).
    stop_at_eos: sequences, stop at [EOS] too when the last span is open (else only at the next
      sentinel, as 4M's sampler does; the parity replay uses that).
    choice_temperature: MaskGIT's annealed noise on which positions are committed (0 = off).
    commit_step: replay a recorded MaskGIT commit order, int [B, N] or [N] (parity checks).
    """

    name: str
    scheme: str | None = None
    steps: int = 8
    token_schedule: str | None = None
    temperature: float = 1.0
    temperature_schedule: str = "constant"
    top_k: int | float = 0
    top_p: float | None = None
    guidance_scale: float = 1.0
    guidance: Mapping[str, float] | None = dataclasses.field(default=None, compare=False)
    guidance_schedule: str = "constant"
    max_new_tokens: int | None = None
    stop_at_eos: bool = True
    choice_temperature: float = 0.0
    commit_step: Any = dataclasses.field(default=None, compare=False, repr=False)

    def filter(self) -> Filter:
        return Filter(top_k=self.top_k, top_p=self.top_p)


@dataclasses.dataclass
class Generation:
    tokens: dict[str, np.ndarray]  # grids [B, gh, gw]; sequences [B, L] merged ids (PAD-padded)
    text: dict[str, list[str]]  # sequence targets, decoded
    decoded: dict[str, np.ndarray]  # grid targets through their tokenizer (when one is loaded)
    trace: dict[str, dict[str, np.ndarray]]  # per target: decode_step / per-step ids + log-probs
    notices: list[str]
    seconds: dict[str, float]  # wall time per target (including compilation on first use)

    def first(self, n: int) -> "Generation":
        """The first `n` samples (e.g. of a batch padded to a compiled size)."""
        def cut(tr, key, v):
            if isinstance(v, list):
                return v[:n]
            # A grid target's per-step trace is [S, B, N] (steps first); all else is batch-first.
            steps_first = "decode_step" in tr and key in ("step_ids", "step_logp")
            return np.asarray(v)[:, :n] if steps_first else np.asarray(v)[:n]

        return Generation(
            tokens={k: v[:n] for k, v in self.tokens.items()},
            text={k: v[:n] for k, v in self.text.items()},
            decoded={k: v[:n] for k, v in self.decoded.items()},
            trace={t: {k: cut(tr, k, v) for k, v in tr.items()} for t, tr in self.trace.items()},
            notices=self.notices, seconds=self.seconds)


# ------------------------------------------------------------------------------------------
# Jitted stages. graphdef and settings are static; weights and arrays are traced.
# ------------------------------------------------------------------------------------------
def _grid_stage(graphdef, state, cond, tokens, known, rng, counts, temps, guidance, commit_step,
                *, name, scheme, flt, choice_temperature, return_trace, groups, static_counts,
                num_known):
    model = nnx.merge(graphdef, state)

    def logits_fn(tok, kn, query):
        return model_fns.grid_logits(model, cond, name, tok, kn, query, groups)

    def compact_logits_fn(tok, kn, query, sizes):
        return model_fns.grid_logits_compact(model, cond, name, tok, kn, query, sizes, groups)

    counts = np.asarray(static_counts) if static_counts is not None else counts
    return maskgit.iterative_decode(
        logits_fn, tokens, known, rng, counts, temps, guidance if groups > 1 else None,
        scheme=scheme, flt=flt, commit_step=commit_step, choice_temperature=choice_temperature,
        return_trace=return_trace, num_known=num_known, compact_logits_fn=compact_logits_fn)


def _seq_stage(graphdef, state, cond, tgt_ids, tgt_known, start, rng, temps, guidance, *, name,
               max_new, stop_ids, pad_id, flt, groups, use_cache):
    model = nnx.merge(graphdef, state)
    t = model.spec.index(name)
    b, n = tgt_ids.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    enc = model_fns.with_target_slots(cond, t, tgt_ids, pos, tgt_known, groups)
    tile = functools.partial(model_fns.tile_groups, groups=groups)
    ungroup = functools.partial(model_fns.split_groups, groups=groups)
    if use_cache:
        cache = model_fns.seq_prefill(model, enc, name, max_new)

        def step_fn(c, tok, p):  # the cache knows its position (p == c.length)
            logits, c = decoding.ar_step(model, c, tile(tok))
            return ungroup(logits), c
    else:  # the reference algorithm: the whole decoder (and encoder) again for every token
        step_fn, cache = ar.no_cache_step(
            lambda ids: ungroup(model_fns.seq_full_logits(model, enc, name, tile(ids))), b, max_new)
    return ar.autoregressive_decode(step_fn, cache, start, rng, max_new_tokens=max_new,
                                    temperatures=temps, guidance=guidance if groups > 1 else None,
                                    stop_ids=stop_ids, pad_id=pad_id, flt=flt)


_STATIC = {
    _grid_stage: ("graphdef", "name", "scheme", "flt", "choice_temperature", "return_trace",
                  "groups", "static_counts", "num_known"),
    _seq_stage: ("graphdef", "name", "max_new", "stop_ids", "pad_id", "flt", "groups", "use_cache"),
}


@functools.lru_cache(maxsize=None)
def _jitted(fn, compiler_options: tuple = ()):
    """The jitted stage; one per set of XLA compiler options (e.g. tests' fast compilation)."""
    return jax.jit(fn, static_argnames=_STATIC[fn], compiler_options=dict(compiler_options) or None)


# ------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------
LOOPS = ("auto", "buckets", "scan", "unrolled")


class Generator:
    """Chained generation with one model (+ optional tokenizers for native inputs/outputs).

    tokenizers: {modality name: ImageTokenizer | TextTokenizer}; a TextTokenizer under any key
      serves every sequence modality. resize: resize wrong-size images with a notice (else error).
    loop: "auto" = "buckets" (a host loop over jitted step programs, at most `buckets` shapes
      per target, `fourm.generate.stepwise`: fast to compile and to run),
      "scan" (one lax.scan at the largest step's shape) or "unrolled" (exact shapes per step in
      one program; needs the same number of known tokens in every sample). kv_cache: False re-runs the decoder
      per token (the reference algorithm; for checks). The reserved text ids (EOS, sentinels)
      are each sequence modality's own (`Modality.text`). compiler_options:
      XLA options for the stages (e.g. {"xla_backend_optimization_level": 0} to compile fast).
    """

    def __init__(self, model, tokenizers: Mapping[str, Any] | None = None, *, resize: bool = True,
                 loop: str = "auto", kv_cache: bool = True,
                 compiler_options: Mapping[str, Any] | None = None,
                 buckets: int = stepwise.DEFAULT_BUCKETS):
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        if int(buckets) < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.buckets = int(buckets)
        self.model, self.spec = model, model.spec
        self.graphdef, self.state = nnx.split(model)
        self.resize, self.loop, self.kv_cache = resize, loop, kv_cache
        opts = tuple(sorted((compiler_options or {}).items()))
        self._grid_fn, self._seq_fn = _jitted(_grid_stage, opts), _jitted(_seq_stage, opts)
        self._step_fn = stepwise.jitted_model_step(opts)
        self.image_tokenizers, self.text_tokenizer = {}, None
        for key, tok in dict(tokenizers or {}).items():
            if tokenizer_kind(tok) == "sequence":
                self.text_tokenizer = tok
            else:
                self.image_tokenizers[key] = tok
        check_tokenizers(self.spec, self.image_tokenizers, self.text_tokenizer)

    # -- validation ----------------------------------------------------------------------
    def _modality(self, name: str, role: str):
        if name not in self.spec.names:
            raise GenerationInputError(f"unknown {role} modality {name!r}; this model has "
                                       f"{list(self.spec.names)}")
        return self.spec.modality(name)

    def _targets(self, targets, conditions) -> list[Target]:
        if not targets:
            raise GenerationInputError("no targets given")
        out = [t if isinstance(t, Target) else Target(str(t)) for t in targets]
        seen = set()
        for t in out:
            m = self._modality(t.name, "target")
            if t.name not in self.spec.domains_out:
                raise GenerationInputError(f"{t.name!r} is not an output of this model; outputs: "
                                           f"{list(self.spec.domains_out)}")
            if t.name in seen:
                raise GenerationInputError(f"target {t.name!r} listed twice")
            seen.add(t.name)
            scheme = t.scheme or ("autoregressive" if m.kind == "sequence" else "maskgit")
            ok = ("autoregressive",) if m.kind == "sequence" else maskgit.SCHEMES
            if scheme not in ok:
                raise GenerationInputError(f"target {t.name!r} ({m.kind}): scheme {scheme!r} not "
                                           f"supported; use one of {ok}")
        return out

    def prepare(self, conditions: Mapping[str, Any], batch_size: int | None, notices: list):
        states = {}
        for name, value in conditions.items():
            m = self._modality(name, "condition")
            if name not in self.spec.domains_in:
                raise GenerationInputError(f"{name!r} is not an input of this model; inputs: "
                                           f"{list(self.spec.domains_in)}")
            if m.kind == "pixels":
                states[name] = prepare_pixels(m, value, resize=self.resize, notices=notices)
            elif m.kind == "grid":
                states[name] = prepare_grid(m, value, self.image_tokenizers.get(name),
                                            resize=self.resize, notices=notices)
            else:
                states[name] = prepare_sequence(m, value, self.text_tokenizer)
        return broadcast_states(states, batch_size)

    # -- main entry ----------------------------------------------------------------------
    def generate(self, conditions: Mapping[str, Any], targets: Sequence[Target | str], *,
                 seed: int = 0, batch_size: int | None = None, return_trace: bool = False,
                 decode: bool = True) -> Generation:
        notices: list[str] = []
        targets = self._targets(targets, conditions)
        states, batch = self.prepare(dict(conditions), batch_size, notices)
        for t in targets:
            if t.name in states and states[t.name].fully_known:
                raise GenerationInputError(f"target {t.name!r} is also given in full as a condition;"
                                           " drop one, or give it partly (Partial / text with "
                                           "sentinels) to fill in the rest")
        rng = jax.random.PRNGKey(seed)
        trace, seconds = {}, {}
        for i, t in enumerate(targets):
            t0 = time.perf_counter()
            key = jax.random.fold_in(rng, i)
            m = self.spec.modality(t.name)
            if m.kind == "sequence":
                states[t.name], trace[t.name] = self._run_sequence(t, states, batch, key)
            else:
                states[t.name], trace[t.name] = self._run_grid(t, states, batch, key, return_trace)
            seconds[t.name] = time.perf_counter() - t0
        return self._results(targets, states, trace, notices, seconds, decode)

    # -- guidance groups -----------------------------------------------------------------
    def _groups(self, t: Target, cond_names: Sequence[str]):
        """(removed condition set per group, weights [K]) for target t; one group = no guidance."""
        if t.guidance:
            unknown = [n for n in t.guidance if n not in cond_names]
            if unknown:
                raise GenerationInputError(f"target {t.name!r}: guidance names {unknown}, which are "
                                           f"not conditions here ({list(cond_names)})")
            sets = [frozenset([n]) for n in t.guidance]
            weights = [float(w) for w in t.guidance.values()]
        elif t.guidance_scale != 1.0 and cond_names:
            sets, weights = [frozenset(cond_names)], [float(t.guidance_scale)]
        else:
            return [frozenset()], np.zeros((0,), np.float32)
        union = frozenset().union(*sets)
        return [union] + [union - s for s in sets], np.asarray(weights, np.float32)

    def _conditions_for(self, t: Target, states) -> list[str]:
        names = [n for n in self.spec.names if n in states and n != t.name and n in self.spec.domains_in]
        return [n for n in names if states[n].known.any()]

    # -- grid targets --------------------------------------------------------------------
    def _run_grid(self, t: Target, states, batch, key, return_trace):
        m = self.spec.modality(t.name)
        n = m.num_tokens
        scheme = t.scheme or "maskgit"
        own = states.get(t.name)
        tokens = own.ids if own is not None else np.zeros((batch, n), np.int32)
        known = own.known if own is not None else np.zeros((batch, n), bool)
        unknown = (~known).sum(-1)
        sched_name = t.token_schedule or ("linear" if scheme == "roar" else "cosine")
        counts = schedules.per_sample_counts(sched_name, t.steps, unknown)
        same = bool((counts == counts[0]).all()) and len(set(known.sum(-1).tolist())) == 1
        n_steps = counts.shape[1]
        if (n_steps > 1 or known.any()) and t.name not in self.spec.domains_in:
            raise GenerationInputError(
                f"target {t.name!r} is not an input modality of this model, so tokens decoded in one "
                "step cannot inform the next: use steps=1 and no partly given tokens")
        temps = schedules.temperature_schedule(t.temperature_schedule, t.temperature, counts[0])
        cond_names = self._conditions_for(t, states)
        removed, weights = self._groups(t, cond_names)
        guidance = schedules.guidance_schedule(weights, n_steps, t.guidance_schedule) if len(weights) \
            else np.zeros((n_steps, 0), np.float32)
        cond = condition_slots(self.spec, states, cond_names, removed, batch)
        commit = None
        if t.commit_step is not None:
            commit = np.broadcast_to(np.asarray(t.commit_step, np.int32).reshape(-1, n), (batch, n))
            maskgit.check_commit_step(commit, known, counts)
        if self.loop in ("auto", "buckets"):
            step_fn = stepwise.model_step_fn(
                self._step_fn, self.graphdef, self.state, cond, name=t.name, scheme=scheme,
                flt=t.filter(), choice_temperature=float(t.choice_temperature),
                return_trace=return_trace, groups=len(removed))
            res = stepwise.bucketed_decode(
                step_fn, tokens, known, key, counts, temps, guidance if len(removed) > 1 else None,
                scheme=scheme, commit_step=commit, return_trace=return_trace, buckets=self.buckets)
            return self._grid_result(res, counts, batch, n, return_trace)
        unrolled = self.loop == "unrolled"
        if unrolled and not same:
            raise GenerationInputError("loop='unrolled' needs the same number of known tokens and "
                                       "the same schedule for every sample")
        res = self._grid_fn(
            self.graphdef, self.state, cond, tokens, known, key, counts, temps, guidance, commit,
            name=t.name, scheme=scheme, flt=t.filter(), choice_temperature=float(t.choice_temperature),
            return_trace=return_trace, groups=len(removed),
            static_counts=tuple(int(c) for c in counts[0]) if unrolled else None,
            num_known=int(known[0].sum()) if unrolled else None)
        return self._grid_result(res, counts, batch, n, return_trace)

    @staticmethod
    def _grid_result(res, counts, batch, n, return_trace):
        out = ModState(np.asarray(res.tokens), np.ones((batch, n), bool))
        tr = {"decode_step": np.asarray(res.decode_step), "num_tokens_per_step": counts}
        if return_trace:
            tr.update(step_ids=np.asarray(res.trace_ids), step_logp=np.asarray(res.trace_logp))
        return out, tr

    # -- sequence targets ----------------------------------------------------------------
    def _run_sequence(self, t: Target, states, batch, key):
        m = self.spec.modality(t.name)
        ids = m.text
        own = states.get(t.name)
        if own is None:  # nothing given: the input is a lone [S_1] (4M's empty sequence)
            own = pack_sequences(m, [[ids.sentinel(1)]] * batch)
        rows = [[int(x) for x in r[k]] for r, k in zip(own.ids, own.known)]
        sents = [[x for x in r if x in ids.sentinel_ids] for r in rows]
        if any(not s for s in sents):
            raise GenerationInputError(f"target {t.name!r}: the given text has no sentinel ([S_1]) "
                                       "marking what to generate")
        start = np.asarray([s[0] for s in sents], np.int32)
        # Stop at the sentinel after the last given one; also at EOS when the last span is open.
        stops = {max(s) + 1 for s in sents}
        if len(stops) != 1:
            raise GenerationInputError(f"target {t.name!r}: samples have different sentinel counts")
        open_end = t.stop_at_eos and all(r[-1] in ids.sentinel_ids for r in rows)
        stop_ids = (stops.pop(),) + ((ids.eos_id,) if open_end else ())
        max_new = int(t.max_new_tokens or (m.max_length - 1))
        if not 1 <= max_new <= m.max_length:
            raise GenerationInputError(f"target {t.name!r}: max_new_tokens={max_new} outside "
                                       f"[1, {m.max_length}]")
        temps = schedules.temperature_schedule(t.temperature_schedule, t.temperature,
                                               np.ones(max_new, np.int64))
        cond_names = self._conditions_for(t, states)
        removed, weights = self._groups(t, cond_names)
        guidance = schedules.guidance_schedule(weights, max_new, t.guidance_schedule) if len(weights) \
            else np.zeros((max_new, 0), np.float32)
        cond = condition_slots(self.spec, states, cond_names, removed, batch)
        res = self._seq_fn(self.graphdef, self.state, cond, own.ids, own.known, start, key, temps,
                         guidance, name=t.name, max_new=max_new, stop_ids=stop_ids, pad_id=ids.pad_id,
                         flt=t.filter(), groups=len(removed), use_cache=self.kv_cache)
        gen = np.asarray(res.tokens)
        lengths = np.asarray(res.length)
        merged = [merge_spans(r, [s] + g[:n].tolist(), ids)[: m.max_length]
                  for r, s, g, n in zip(rows, start, gen, lengths)]
        out = pack_sequences(m, merged)
        tr = {"generated": gen, "length": lengths, "stopped": np.asarray(res.stopped),
              "step_logp": np.asarray(res.logp), "merged": merged}
        return out, tr

    # -- outputs -------------------------------------------------------------------------
    def _results(self, targets, states, trace, notices, seconds, decode) -> Generation:
        tokens, text, decoded = {}, {}, {}
        for t in targets:
            m, st = self.spec.modality(t.name), states[t.name]
            if m.kind == "sequence":
                tokens[t.name] = st.ids
                if self.text_tokenizer is not None:
                    drop = {m.text.eos_id, m.text.pad_id}
                    text[t.name] = [self.text_tokenizer.decode([int(x) for x in r if x not in drop])
                                    for r in trace[t.name]["merged"]]
            else:
                tokens[t.name] = st.ids.reshape((-1,) + tuple(m.grid))
                tok = self.image_tokenizers.get(t.name)
                if decode and tok is not None:
                    decoded[t.name] = np.asarray(tok.decode(tokens[t.name]))
        return Generation(tokens, text, decoded, trace, notices, seconds)


def check_tokenizers(spec, image_tokenizers: Mapping[str, Any], text_tokenizer) -> None:
    """The checkpoint and the tokenizers must agree on modality, grid and vocabulary."""
    for name, tok in image_tokenizers.items():
        if name not in spec.names:
            raise GenerationInputError(f"tokenizer given for {name!r}, which this model does not "
                                       f"have ({list(spec.names)})")
        m = spec.modality(name)
        if m.kind != "grid":
            raise GenerationInputError(f"image tokenizer given for {name!r}, a {m.kind} modality")
        grid, vocab = tuple(getattr(tok, "grid", m.grid)), int(getattr(tok, "vocab_size", m.vocab_size))
        if grid != tuple(m.grid) or vocab != m.vocab_size:
            raise GenerationInputError(
                f"checkpoint and tokenizer disagree on {name!r}: model expects grid {tuple(m.grid)} "
                f"and vocabulary {m.vocab_size}, tokenizer {getattr(tok, 'name', '?')} has grid "
                f"{grid} and vocabulary {vocab}")
    if text_tokenizer is not None:
        vocab = getattr(text_tokenizer, "vocab_size", None)
        layout = getattr(text_tokenizer, "layout", None)
        for m in spec.modalities:
            if m.kind == "sequence" and vocab is not None and int(vocab) != m.vocab_size:
                raise GenerationInputError(
                    f"checkpoint and text tokenizer disagree on {m.name!r}: model vocabulary "
                    f"{m.vocab_size}, tokenizer vocabulary {int(vocab)}")
            if m.kind == "sequence" and layout is not None and layout.num_sentinels != m.text.num_sentinels:
                raise GenerationInputError(
                    f"checkpoint and text tokenizer disagree on {m.name!r}: model layout has "
                    f"{m.text.num_sentinels} sentinels, tokenizer {layout.num_sentinels}")


def generate(model, conditions: Mapping[str, Any], targets: Sequence[Target | str], *,
             tokenizers: Mapping[str, Any] | None = None, seed: int = 0, **kw) -> Generation:
    """One-shot `Generator(model, tokenizers).generate(conditions, targets, seed=seed, ...)`."""
    gen_kw = {k: kw.pop(k) for k in ("resize", "loop", "kv_cache", "compiler_options",
                                     "buckets")
              if k in kw}
    return Generator(model, tokenizers, **gen_kw).generate(conditions, targets, seed=seed, **kw)
