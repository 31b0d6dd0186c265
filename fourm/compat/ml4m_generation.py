"""Generation half of `fourm-ml4m check`: replay the fixture's greedy 4M generation runs.

The fixture (README section 5, `generation.json` / `generation.npz`) records three runs of 4M's
`GenerationSampler.generate` on sample 0, conditioned on its full `rgb@224`:

  depth_maskgit8   tok_depth@224, MaskGIT, 8 cosine steps (7 21 32 38 38 32 21 7), greedy
  depth_maskgit1   tok_depth@224, MaskGIT, 1 step (all 196 tokens at once), greedy
  caption_ar       caption, autoregressive, up to 20 tokens, greedy

They run here through the ordinary API (`fourm.generate.chain.Generator` with `Target`s that
state the same settings): the same algorithm, not a special path. One thing is replayed: in
greedy mode 4M gives every candidate confidence 1 and picks MaskGIT's committed positions by
torch's top-k tie-breaking, so the 8-step run commits at step s exactly the positions the fixture
records with `decode_step == s` (`Target.commit_step`, the sampler's forced commit order). The
1-step run and the first step of the 8-step run do not depend on that choice.

Compared token for token: final tokens, per-step argmax at every still-masked position, commit
steps, the caption sequence and the merged caption; and the max abs difference of the log-probs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

RUNS = ("depth_maskgit8", "depth_maskgit1", "caption_ar")
LOGPROB_ATOL = 1e-4  # README section 6: log-probs within about 1e-4 absolute


def _load(fixture_dir: Path):
    with np.load(fixture_dir / "generation.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads((fixture_dir / "generation.json").read_text())
    return arrays, {r["key"]: r for r in meta["runs"]}


def _targets(runs: dict, g: dict[str, np.ndarray]):
    from fourm.generate.chain import Target

    out = {}
    for key in RUNS:
        r = runs[key]
        if r["scheme"] == "maskgit":
            commit = g[f"{key}/decode_step"] if r["decoding_steps"] > 1 else None
            out[key] = Target(r["target_domain"], scheme="maskgit", steps=int(r["decoding_steps"]),
                              token_schedule=r["token_decoding_schedule"],
                              temperature=float(r.get("temperature", 0.0)), commit_step=commit)
        else:
            out[key] = Target(r["target_domain"], scheme="autoregressive",
                              max_new_tokens=int(r["max_new_tokens"]), temperature=0.0)
    return out


def check_generation(model, fixture_dir: str | Path, *, loop: str = "auto",
                     compiler_options: dict | None = None) -> dict[str, Any]:
    """Run the fixture's generation runs on a converted 4M model (a `FourM` with the fixture's
    modalities) and compare. Returns {run: {...figures...}, "ok": bool}."""
    from fourm.generate.chain import Generator, Normalised, TextIds

    fixture_dir = Path(fixture_dir)
    g, runs = _load(fixture_dir)
    cond = {"rgb@224": Normalised(np.transpose(g["cond/rgb@224/tensor"], (0, 2, 3, 1)))}
    # 4M's text layout: [S_i] = 4 + i, 200 sentinels, EOS = 3.
    gen = Generator(model, loop=loop, text_ids=TextIds(num_sentinels=200),
                    compiler_options=compiler_options)
    report: dict[str, Any] = {}
    for key, target in _targets(runs, g).items():
        out = gen.generate(cond, [target], seed=0, return_trace=True)
        tr = out.trace[target.name]
        if target.scheme == "maskgit":
            report[key] = _compare_grid(key, g, tr, out.tokens[target.name].reshape(-1))
        else:
            report[key] = _compare_seq(key, g, tr)
    report["ok"] = all(r["ok"] for r in report.values())
    return report


def _compare_grid(key: str, g: dict, tr: dict, tokens: np.ndarray) -> dict:
    want_steps = g[f"{key}/num_tokens_per_step"]
    got_steps = tr["num_tokens_per_step"][0]
    ids, logp = tr["step_ids"][:, 0], tr["step_logp"][:, 0]  # [S, N]
    want_ids, want_lp = g[f"{key}/step_argmax"], g[f"{key}/step_argmax_logprob"]
    predicted = want_ids >= 0
    r = {
        "schedule_equal": bool(np.array_equal(got_steps, want_steps)),
        "token_mismatches": int((tokens != g[f"{key}/tokens"]).sum()),
        "decode_step_mismatches": int((tr["decode_step"][0] != g[f"{key}/decode_step"]).sum()),
        "step_argmax_mismatches": int((ids != want_ids).sum()),
        "first_step_argmax_mismatches": int((ids[0] != want_ids[0]).sum()),
        "num_predictions": int(predicted.sum()),
        "logprob_max_abs_diff": float(np.abs(np.where(predicted, logp - want_lp, 0.0)).max()),
    }
    r["ok"] = (r["schedule_equal"] and r["token_mismatches"] == 0 and r["decode_step_mismatches"] == 0
               and r["step_argmax_mismatches"] == 0 and r["logprob_max_abs_diff"] <= LOGPROB_ATOL)
    return r


def _compare_seq(key: str, g: dict, tr: dict) -> dict:
    n = int(tr["length"][0])
    seq = np.concatenate([[5], tr["generated"][0, :n]])  # [S_1] start + generated ids
    want_seq, want_merged = g[f"{key}/sequence"], g[f"{key}/merged"]
    want_lp = g[f"{key}/step_argmax_logprob"]
    m = min(len(want_lp), n)
    r = {
        "num_generated": n, "expected_num_generated": int(g[f"{key}/num_generated"]),
        "token_mismatches": int((seq[:len(want_seq)] != want_seq[:len(seq)]).sum())
        + abs(len(seq) - len(want_seq)),
        "merged_equal": bool(np.array_equal(np.asarray(tr["merged"][0]), want_merged)),
        "logprob_max_abs_diff": float(np.abs(tr["step_logp"][0, :m] - want_lp[:m]).max()),
    }
    r["ok"] = (r["token_mismatches"] == 0 and r["merged_equal"] and n == r["expected_num_generated"]
               and r["logprob_max_abs_diff"] <= LOGPROB_ATOL)
    return r


def format_report(report: dict[str, Any]) -> str:
    lines = ["generation parity (greedy, vs ml-4m GenerationSampler):"]
    for key in RUNS:
        if key not in report:
            continue
        r = report[key]
        figures = ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items() if k != "ok")
        lines.append(f"  {'PASS' if r['ok'] else 'FAIL'} {key}: {figures}")
    lines.append(f"  generation parity: {'PASS' if report.get('ok') else 'FAIL'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# `fourm-ml4m check` section (fourm.compat.ml4m_check imports this module to plug it in).
# ------------------------------------------------------------------------------------------
def generation_section(ctx) -> list:
    """Rows for `fourm.compat.ml4m_check`: one per compared figure of each run."""
    from fourm.compat.ml4m_check import Row

    if not (ctx.fixture / "generation.npz").exists():
        return []
    # The default loop (bucketed step programs, fourm.generate.stepwise); the scan and unrolled
    # loops give the same results (tests/test_generate_chain.py).
    report = check_generation(ctx.model, ctx.fixture, loop="auto",
                              compiler_options=getattr(ctx, "compiler_options", None))
    ctx.extras["generation"] = report
    rows = []
    for key in RUNS:
        for name, value in report[key].items():
            if name == "ok":
                continue
            if isinstance(value, float):
                rows.append(Row("generation", f"{key}/{name}", "float", (), f"{value:.3g}",
                                value <= LOGPROB_ATOL))
            elif isinstance(value, bool):
                rows.append(Row("generation", f"{key}/{name}", "bool", (), str(value), value))
            elif name == "num_generated":
                want = report[key]["expected_num_generated"]
                rows.append(Row("generation", f"{key}/{name}", "int", (), f"{value} (4M: {want})",
                                value == want))
            elif name == "expected_num_generated":
                continue
            elif name.endswith("mismatches"):
                rows.append(Row("generation", f"{key}/{name}", "int", (), f"{value} mismatches",
                                value == 0))
            else:
                rows.append(Row("generation", f"{key}/{name}", "int", (), str(value), None))
    rows.append(Row("generation", "commit order", "skip", (), "-", None,
                    "depth_maskgit8 commits the positions 4M's greedy tie-break chose (decode_step)"))
    return rows


def _register() -> None:
    from fourm.compat.ml4m_check import register_section

    register_section("generation", generation_section)


_register()
