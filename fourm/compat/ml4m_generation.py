"""Generation half of `fourm-ml4m check`: replay every greedy 4M generation run a fixture recorded.

A fixture's `generation.json` lists its runs (README section 5 of a fixture): each has a `key`,
a `target_domain`, a `scheme` (maskgit | roar | autoregressive), the `cond_domains` it was
conditioned on, its schedule (`decoding_steps`, `token_decoding_schedule`, per-step entries with
temperature and guidance) and, for sequences, `max_new_tokens`. `generation.npz` holds the
conditioning dicts (`cond/<mod>/...`, or `<key>/cond/<mod>/...`), each run's initial target
(`<key>/init/<target>/...`) and its results. Conditions may be pixels, token grids or token
sequences, any number of them. Nothing here knows a run key or a modality name: everything
comes from those two files and the model's modality table.

Each run goes through the ordinary API (`fourm.generate.chain.Generator` with a `Target` stating
the same settings): the same algorithm, not a special path. One thing is replayed: in greedy mode
4M gives every MaskGIT candidate confidence 1 and picks the committed positions by torch's top-k
tie-breaking (ROAR: by its RNG), so a multi-step run commits at step s exactly the positions the
fixture records with `decode_step == s` (`Target.commit_step`). A one-step MaskGIT run and the
first step of every run do not depend on that choice.

Compared: the token schedule, final tokens, commit steps, per-step argmax at every queried
position, the generated sequence and the merged sequence (token for token), the max abs
difference of the log-probs, and the decoded text when 4M's text tokenizer is at hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fourm.compat.ml4m_check import FixtureError, Row, register_section
from fourm.compat.ml4m_text import ML4M_TEXT_LAYOUT, SPECIALS, ML4MTextTokenizer, find_tokenizer_file
from fourm.generate import schedules
from fourm.generate.chain import Generator, GenerationInputError, Normalised, Partial, Target, TextIds
from fourm.tokenizers.text import EOS, PAD

LOGPROB_ATOL = 1e-4  # fixture README section 6: log-probs within about 1e-4 absolute
GREEDY_ATOL = 1e-10  # ml-4m's greedy test: np.isclose(temperature, 0, atol=1e-10)
SCHEMES = ("maskgit", "roar", "autoregressive")


@dataclasses.dataclass(frozen=True)
class Run:
    """One recorded generation run, as generation.json states it."""

    key: str
    target: str
    scheme: str
    cond_domains: tuple[str, ...]
    steps: int | None
    token_schedule: str | None
    max_new_tokens: int | None
    num_tokens_per_step: tuple[int, ...] | None


def _load(fixture_dir: Path) -> tuple[dict[str, np.ndarray], list[Run]]:
    npz, js = fixture_dir / "generation.npz", fixture_dir / "generation.json"
    for p in (npz, js):
        if not p.is_file():
            raise FixtureError(f"{p}: no such file (a generation replay needs generation.json + .npz)")
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise FixtureError(f"{js}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("runs"), list) or not meta["runs"]:
        raise FixtureError(f"{js}: expected an object with a non-empty list 'runs'")
    runs, seen = [], set()
    for i, r in enumerate(meta["runs"]):
        runs.append(_parse_run(r, meta, f"{js} runs[{i}]"))
        if runs[-1].key in seen or runs[-1].key == "ok":
            raise FixtureError(f"{js} runs[{i}]: key {runs[-1].key!r} is repeated or reserved")
        seen.add(runs[-1].key)
    return arrays, runs


def _parse_run(r: Any, meta: Mapping[str, Any], where: str) -> Run:
    if not isinstance(r, dict):
        raise FixtureError(f"{where}: expected an object, got {type(r).__name__}")
    for field in ("key", "target_domain", "scheme", "cond_domains"):
        if field not in r:
            raise FixtureError(f"{where}: field {field!r} is missing")
    key, target, scheme = str(r["key"]), str(r["target_domain"]), str(r["scheme"]).lower()
    where = f"{where} ({key!r})"
    if scheme not in SCHEMES:
        raise FixtureError(f"{where}: scheme {scheme!r}; 4M's schemes are {SCHEMES}")
    schedule = r.get("schedule") or []
    others = sorted({str(s.get("target_domain")) for s in schedule} - {target})
    if others:
        raise FixtureError(f"{where}: the schedule also generates {others}; the replay compares one "
                           "target per run (chained runs have no per-target arrays to compare)")
    # Only greedy decoding is reproducible across frameworks: sampling draws from torch's RNG.
    temps = [s.get("temperature", 0.0) for s in schedule] + [meta.get("temperature", 0.0),
                                                              r.get("temperature", 0.0)]
    if any(t is not None and abs(float(t)) > GREEDY_ATOL for t in temps):
        raise FixtureError(f"{where}: temperature {max(map(float, filter(None, temps)))} > 0; only "
                           "greedy runs (temperature 0) can be replayed")
    guided = [s for s in schedule if s.get("cfg_cond_domains")
              and np.any(np.asarray(s.get("cfg_scale", 1.0), np.float64) != 1.0)]
    if guided:
        raise FixtureError(f"{where}: classifier-free guidance (cfg_scale {guided[0]['cfg_scale']}); "
                           "the replay covers 4M's unguided branch (cfg_scale 1) only")
    steps = r.get("decoding_steps")
    if scheme != "autoregressive" and not (isinstance(steps, int) and steps >= 1):
        raise FixtureError(f"{where}: decoding_steps must be a positive integer, got {steps!r}")
    counts = r.get("num_tokens_per_step")
    # 4M's schedule builder gives ROAR a linear schedule whatever token_decoding_schedule says.
    token_schedule = "linear" if scheme == "roar" else r.get("token_decoding_schedule")
    return Run(key, target, scheme, tuple(map(str, r["cond_domains"])), steps,
               token_schedule, r.get("max_new_tokens"),
               tuple(int(c) for c in counts) if counts is not None else None)


def _field(g: Mapping[str, np.ndarray], run: Run, name: str, required: bool = True):
    if name in g:
        return g[name]
    if required:
        raise FixtureError(f"generation.npz: array {name!r} (run {run.key!r}) is missing")
    return None


def _cond_array(g, run: Run, mod: str, field: str, required: bool = True):
    for prefix in (f"{run.key}/cond/{mod}/", f"cond/{mod}/"):
        if prefix + field in g:
            return g[prefix + field]
    if required:
        raise FixtureError(f"generation.npz: no conditioning array 'cond/{mod}/{field}' (or "
                           f"'{run.key}/cond/{mod}/{field}') for run {run.key!r}")
    return None


def _kept(tensor: np.ndarray, input_mask: np.ndarray | None) -> list[list[int]]:
    """Per sample, the ids fed to the encoder (input_mask False), in order."""
    t = np.asarray(tensor).reshape(tensor.shape[0], -1)
    keep = np.ones(t.shape, bool) if input_mask is None else ~np.asarray(input_mask, bool).reshape(t.shape)
    return [[int(x) for x in row[k]] for row, k in zip(t, keep)]


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), pad, np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def run_conditions(spec, g: Mapping[str, np.ndarray], run: Run, text_ids: TextIds) -> dict[str, Any]:
    """The Generator conditions of a run: each cond domain as the kind of input it is."""
    out = {}
    for mod in run.cond_domains:
        if mod not in spec.names:
            raise FixtureError(f"run {run.key!r}: condition {mod!r} is not a modality of the model "
                               f"({list(spec.names)})")
        m = spec.modality(mod)
        tensor = _cond_array(g, run, mod, "tensor")
        mask = _cond_array(g, run, mod, "input_mask", required=False)
        if m.kind == "pixels":
            if mask is not None and np.asarray(mask).any():
                raise FixtureError(f"run {run.key!r}: condition {mod!r} gives only some patches; "
                                   "partial pixel conditions are not replayed")
            out[mod] = Normalised(np.transpose(np.asarray(tensor, np.float32), (0, 2, 3, 1)))
        elif m.kind == "grid":
            ids = np.asarray(tensor).reshape(tensor.shape[0], -1)
            known = np.ones(ids.shape, bool) if mask is None else ~np.asarray(mask, bool).reshape(ids.shape)
            out[mod] = ids if known.all() else Partial(ids.reshape((-1,) + tuple(m.grid)),
                                                       known.reshape((-1,) + tuple(m.grid)))
        else:
            out[mod] = _padded(_kept(tensor, mask), text_ids.pad)
    return out


def run_target(spec, g: Mapping[str, np.ndarray], run: Run, text_ids: TextIds
               ) -> tuple[Target, Any, int | None]:
    """(Target, the target's given part as a condition or None, AR start token or None)."""
    if run.target not in spec.names:
        raise FixtureError(f"run {run.key!r}: target {run.target!r} is not a modality of the model")
    m = spec.modality(run.target)
    pre = f"{run.key}/init/{run.target}/"
    tensor, in_mask = g.get(pre + "tensor"), g.get(pre + "input_mask")
    tgt_mask = g.get(pre + "target_mask")
    if run.scheme == "autoregressive":
        if m.kind != "sequence":
            raise FixtureError(f"run {run.key!r}: autoregressive target {run.target!r} is a {m.kind}")
        rows = _kept(tensor, in_mask) if tensor is not None else [[text_ids.sentinel(1)]]
        sents = [x for x in rows[0] if x in text_ids.sentinel_ids]
        start = sents[0] if sents else text_ids.sentinel(1)
        max_new = run.max_new_tokens
        if max_new is None and tgt_mask is not None:  # 4M decodes at most one token per target slot
            max_new = int((~np.asarray(tgt_mask, bool)).sum(-1).max())
        given = None if all(r == [text_ids.sentinel(1)] for r in rows) else _padded(rows, text_ids.pad)
        # 4M stops only at the target's last sentinel, not at [EOS]
        return Target(run.target, scheme="autoregressive", max_new_tokens=max_new, temperature=0.0,
                      stop_at_eos=False), given, start
    if m.kind != "grid":
        raise FixtureError(f"run {run.key!r}: {run.scheme} target {run.target!r} is a {m.kind}")
    given = None
    known = np.zeros((1, m.num_tokens), bool)
    if tensor is not None and in_mask is not None and (~np.asarray(in_mask, bool)).any():
        known = ~np.asarray(in_mask, bool).reshape(-1, m.num_tokens)
        given = Partial(np.asarray(tensor).reshape((-1,) + tuple(m.grid)), known.reshape((-1,) + tuple(m.grid)))
    commit = None
    if run.scheme == "roar" or run.steps > 1:  # which positions commit when is 4M's tie-break / RNG
        commit = np.where(known, -1, _field(g, run, f"{run.key}/decode_step").reshape(-1, m.num_tokens))
    return Target(run.target, scheme=run.scheme, steps=int(run.steps), token_schedule=run.token_schedule,
                  temperature=0.0, commit_step=commit), given, None


def find_text_tokenizer(fixture_dir: Path, explicit=None) -> ML4MTextTokenizer | None:
    """The text tokenizer to decode with: the one given (object or path), else a
    text_tokenizer*.json in the fixture folder, else None."""
    if isinstance(explicit, ML4MTextTokenizer):
        return explicit
    try:
        path = explicit if explicit is not None else find_tokenizer_file(fixture_dir)
        return ML4MTextTokenizer.load(path) if path is not None else None
    except (ValueError, FileNotFoundError) as e:
        raise FixtureError(f"text tokenizer: {e}") from None


def check_generation(model, fixture_dir: str | Path, *, loop: str = "auto",
                     compiler_options: dict | None = None, text_tokenizer=None) -> dict[str, Any]:
    """Replay the fixture's runs on a converted 4M model and compare.
    Returns {run key: {...figures..., "ok": bool}, "ok": bool}."""
    fixture_dir = Path(fixture_dir)
    g, runs = _load(fixture_dir)
    tok = find_text_tokenizer(fixture_dir, text_tokenizer)
    layout = tok.layout if tok is not None else ML4M_TEXT_LAYOUT
    text_ids = TextIds(pad=SPECIALS[PAD], eos=SPECIALS[EOS], num_sentinels=layout.num_sentinels)
    gen = Generator(model, loop=loop, text_ids=text_ids, compiler_options=compiler_options)
    report: dict[str, Any] = {}
    for run in runs:
        cond = run_conditions(model.spec, g, run, text_ids)
        target, given, start = run_target(model.spec, g, run, text_ids)
        if given is not None:
            cond[run.target] = given
        if run.scheme != "autoregressive" and not _same_schedule(run, g, given, model.spec):
            # fourm's schedule for the run's settings is not 4M's: nothing else is comparable
            report[run.key] = {"schedule_equal": False, "ok": False}
            continue
        try:
            out = gen.generate(cond, [target], seed=0, return_trace=True)
        except (GenerationInputError, ValueError) as e:
            raise FixtureError(f"run {run.key!r}: {e}") from None
        tr = out.trace[run.target]
        if run.scheme == "autoregressive":
            report[run.key] = _compare_seq(run, g, tr, start, tok)
        else:
            report[run.key] = _compare_grid(run, g, tr, out.tokens[run.target].reshape(-1))
    report["ok"] = all(r["ok"] for r in report.values())
    return report


def _same_schedule(run: Run, g: dict, given, spec) -> bool:
    """Whether fourm's token schedule for the run's settings is the one 4M recorded."""
    n = spec.modality(run.target).num_tokens
    unknown = n - int(np.asarray(given.known).reshape(-1, n)[0].sum()) if given is not None else n
    want = _field(g, run, f"{run.key}/num_tokens_per_step")
    try:
        ours = schedules.token_schedule(run.token_schedule or "cosine", int(run.steps), unknown)
    except ValueError:
        return False
    return np.array_equal(ours, want)


def _compare_grid(run: Run, g: dict, tr: dict, tokens: np.ndarray) -> dict:
    key = run.key
    want_steps = _field(g, run, f"{key}/num_tokens_per_step")
    got_steps = tr["num_tokens_per_step"][0]
    ids, logp = tr["step_ids"][:, 0], tr["step_logp"][:, 0]  # [S, N]
    want_ids, want_lp = _field(g, run, f"{key}/step_argmax"), _field(g, run, f"{key}/step_argmax_logprob")
    same_shape = ids.shape == want_ids.shape
    predicted = want_ids >= 0
    r = {
        "schedule_equal": bool(np.array_equal(got_steps, want_steps)
                               and (run.num_tokens_per_step is None
                                    or list(run.num_tokens_per_step) == got_steps.tolist())),
        "token_mismatches": int((tokens != _field(g, run, f"{key}/tokens")).sum()),
        "decode_step_mismatches": int((tr["decode_step"][0] != _field(g, run, f"{key}/decode_step")).sum()),
        "step_argmax_mismatches": int((ids != want_ids).sum()) if same_shape else int(want_ids.size),
        "first_step_argmax_mismatches": int((ids[0] != want_ids[0]).sum()),
        "num_predictions": int(predicted.sum()),
        "logprob_max_abs_diff": (float(np.abs(np.where(predicted, logp - want_lp, 0.0)).max())
                                 if same_shape else float("inf")),
    }
    r["ok"] = (r["schedule_equal"] and r["token_mismatches"] == 0 and r["decode_step_mismatches"] == 0
               and r["step_argmax_mismatches"] == 0 and r["logprob_max_abs_diff"] <= LOGPROB_ATOL)
    return r


def _compare_seq(run: Run, g: dict, tr: dict, start: int, tok: ML4MTextTokenizer | None) -> dict:
    key = run.key
    n = int(tr["length"][0])
    seq = np.concatenate([[start], tr["generated"][0, :n]]).astype(np.int64)
    want_seq, want_merged = _field(g, run, f"{key}/sequence"), _field(g, run, f"{key}/merged")
    want_lp = _field(g, run, f"{key}/step_argmax_logprob")
    m = min(len(want_lp), n)
    r = {
        "num_generated": n, "expected_num_generated": int(_field(g, run, f"{key}/num_generated")),
        "token_mismatches": int((seq[:len(want_seq)] != want_seq[:len(seq)]).sum())
        + abs(len(seq) - len(want_seq)),
        "merged_equal": bool(np.array_equal(np.asarray(tr["merged"][0]), want_merged)),
        "logprob_max_abs_diff": float(np.abs(tr["step_logp"][0, :m] - want_lp[:m]).max()) if m else 0.0,
    }
    text = _field(g, run, f"{key}/decoded_text", required=False)
    if text is not None and tok is not None:
        r["decoded_text_equal"] = tok.decode(seq.tolist()) == str(text)
    r["ok"] = (r["token_mismatches"] == 0 and r["merged_equal"] and n == r["expected_num_generated"]
               and r["logprob_max_abs_diff"] <= LOGPROB_ATOL and r.get("decoded_text_equal", True))
    return r


def format_report(report: dict[str, Any]) -> str:
    lines = ["generation parity (greedy, vs ml-4m GenerationSampler):"]
    for key, r in report.items():
        if key == "ok":
            continue
        figures = ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items() if k != "ok")
        lines.append(f"  {'PASS' if r['ok'] else 'FAIL'} {key}: {figures}")
    lines.append(f"  generation parity: {'PASS' if report.get('ok') else 'FAIL'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# `fourm-ml4m check` section (fourm.compat.ml4m_check imports this module to plug it in).
# ------------------------------------------------------------------------------------------
def _rows(key: str, r: dict) -> list[Row]:
    rows = []
    for name, value in r.items():
        label = f"{key}/{name}"
        if name in ("ok", "expected_num_generated"):
            continue
        if isinstance(value, float):
            rows.append(Row("generation", label, "float", (), f"{value:.3g}", value <= LOGPROB_ATOL))
        elif isinstance(value, bool):
            rows.append(Row("generation", label, "bool", (), str(value), value))
        elif name == "num_generated":
            want = r["expected_num_generated"]
            rows.append(Row("generation", label, "int", (), f"{value} (4M: {want})", value == want))
        elif name.endswith("mismatches"):
            rows.append(Row("generation", label, "int", (), f"{value} mismatches", value == 0))
        else:
            rows.append(Row("generation", label, "int", (), str(value), None))
    return rows


def generation_section(ctx) -> list[Row]:
    """Rows for `fourm.compat.ml4m_check`: one per compared figure of each run."""
    if not (ctx.fixture / "generation.npz").exists():
        return []
    # The default loop (bucketed step programs, fourm.generate.stepwise); the scan and unrolled
    # loops give the same results (tests/test_generate_chain.py).
    report = check_generation(ctx.model, ctx.fixture, loop="auto",
                              compiler_options=getattr(ctx, "compiler_options", None),
                              text_tokenizer=ctx.extras.get("text_tokenizer"))
    ctx.extras["generation"] = report
    rows = []
    for key, r in report.items():
        if key != "ok":
            rows += _rows(key, r)
            if "decoded_text_equal" not in r and "merged_equal" in r:
                rows.append(Row("generation", f"{key}/decoded_text", "skip", (), "-", None,
                                "no text tokenizer (--text_tokenizer, or a text_tokenizer*.json "
                                "in the fixture)"))
    forced = [k for k, r in report.items() if k != "ok" and "decode_step_mismatches" in r]
    if forced:
        rows.append(Row("generation", "commit order", "skip", (), "-", None,
                        "multi-step grid runs commit the positions 4M's tie-break chose (decode_step)"))
    return rows


register_section("generation", generation_section)
