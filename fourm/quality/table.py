"""`quality.json`: one row per task, the model beside its single-task specialist, its tokenizer's
ceiling and a mean baseline, in the schema of issue 16:

    {"tasks": {"rgb->depth": {"metric": "abs_rel", "higher_is_better": false, "fourm": 0.21,
                              "specialist": 0.12, "tokenizer_ceiling": 0.05, "mean_baseline": 0.3,
                              ...more metrics under other keys},
               ...},
     "minutes": {"scenes": .., "tokenizers": .., "pretokenize": .., "pretrain": .., "generate": ..}}

`specialist` is null unless a specialists file (fourm.bench.specialists) is given. caption->rgb is
judged by the checker only where the checker is >= 95% right on true images; below that its
figures are null and `checker_accuracy_on_true_images` says why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from fourm.quality.checker import MIN_ACCURACY

# task -> (headline metric, higher is better, evaluate_scenes figure for fourm, ceiling, baseline)
TASKS = {
    "rgb->depth": ("abs_rel", False, "depth_abs_rel", "depth_abs_rel_tokenizer_roundtrip",
                   "depth_abs_rel_mean_map_baseline"),
    "rgb->normals": ("mean_angle_deg", False, "normals_angle_deg", "normals_angle_tokenizer_roundtrip_deg",
                     "normals_angle_mean_map_baseline_deg"),
    "rgb->semseg": ("miou", True, "semseg_miou", "semseg_miou_tokenizer_roundtrip",
                    "semseg_miou_mean_map_baseline"),
    "rgb->caption": ("count_acc", True, "caption_count_accuracy", "caption_count_acc_tokenizer_roundtrip",
                     "caption_count_acc_majority_baseline"),
    "caption->rgb": ("colour_match", True, "caption_rgb_colour_match",
                     "caption_rgb_colour_match_tokenizer_roundtrip", "caption_rgb_colour_match_mean_baseline"),
}
# Further metrics per task: name in the row -> (figure prefix; the same three suffixes as above).
EXTRA = {
    "rgb->depth": {"rmse": ("depth_rmse", "_tokenizer_roundtrip", "_mean_map_baseline")},
    "rgb->semseg": {"pixel_acc": ("semseg_pixel_acc", "_tokenizer_roundtrip", "_mean_map_baseline")},
    "rgb->caption": {f"{a}_{b}": (f"caption_{a}_{b}", "_tokenizer_roundtrip", "_majority_baseline")
                     for a in ("colour", "shape") for b in ("precision", "recall")},
    "caption->rgb": {"count_match": ("caption_rgb_count_match", "_tokenizer_roundtrip", "_mean_baseline"),
                     "colour_recall": ("caption_rgb_colour_recall", "_tokenizer_roundtrip", "_mean_baseline")},
}
SOURCES = ("fourm", "specialist", "tokenizer_ceiling", "mean_baseline")
STAGE_NAMES = ("scenes", "tokenizers", "pretokenize", "pretrain", "generate")


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def build(figures: Mapping[str, Any], minutes: Mapping[str, float],
          specialists: Mapping[str, Any] | None = None) -> dict:
    """The quality table from `fourm.generate.evaluate` figures, per-stage minutes and the
    specialists' figures ({"tasks": {task: {metric: value}}, "minutes": ..}) if measured."""
    spec_tasks = (specialists or {}).get("tasks", {})
    tasks = {}
    for task, (metric, higher, own, ceil, base) in TASKS.items():
        row = {"metric": metric, "higher_is_better": higher, "fourm": _num(figures.get(own)),
               "specialist": _num(spec_tasks.get(task, {}).get(metric)),
               "tokenizer_ceiling": _num(figures.get(ceil)), "mean_baseline": _num(figures.get(base))}
        for name, (prefix, c_sfx, b_sfx) in EXTRA.get(task, {}).items():
            row[name] = {"fourm": _num(figures.get(prefix)),
                         "specialist": _num(spec_tasks.get(task, {}).get(name)),
                         "tokenizer_ceiling": _num(figures.get(prefix + c_sfx)),
                         "mean_baseline": _num(figures.get(prefix + b_sfx))}
        tasks[task] = row
    _gate_checker(tasks["caption->rgb"], figures)
    minutes = {k: round(float(v), 2) for k, v in minutes.items()}
    if specialists and "minutes" in specialists:  # each specialist's training budget
        minutes["specialist_each"] = round(float(specialists["minutes"]), 2)
    return {"tasks": tasks, "minutes": minutes}


def _gate_checker(row: dict, figures: Mapping[str, Any]) -> None:
    colour_acc = _num(figures.get("checker_colour_accuracy_true"))
    count_acc = _num(figures.get("checker_count_accuracy_true"))
    row["checker_accuracy_on_true_images"] = colour_acc
    row["count_match"]["checker_accuracy_on_true_images"] = count_acc
    row["checker_min_accuracy"] = MIN_ACCURACY
    for acc, target in ((colour_acc, row), (colour_acc, row["colour_recall"]), (count_acc, row["count_match"])):
        if acc is None or acc < MIN_ACCURACY:  # an unvalidated checker judges nothing
            for s in SOURCES:
                target[s] = None


def check_schema(q: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first field of `q` that departs from the schema above."""
    if set(q) != {"tasks", "minutes"}:
        raise ValueError(f"quality.json: top-level keys {sorted(q)}, expected ['minutes', 'tasks']")
    for task, (metric, higher, *_rest) in TASKS.items():
        row = q["tasks"].get(task)
        if row is None:
            raise ValueError(f"quality.json: tasks[{task!r}] missing")
        if row.get("metric") != metric or row.get("higher_is_better") is not higher:
            raise ValueError(f"quality.json: tasks[{task!r}] metric/higher_is_better "
                             f"{row.get('metric')!r}/{row.get('higher_is_better')!r}, expected {metric!r}/{higher!r}")
        for s in SOURCES:
            if s not in row or not (row[s] is None or isinstance(row[s], (int, float))):
                raise ValueError(f"quality.json: tasks[{task!r}][{s!r}] must be a number or null, got {row.get(s)!r}")
    if "checker_accuracy_on_true_images" not in q["tasks"]["caption->rgb"]:
        raise ValueError("quality.json: tasks['caption->rgb'] lacks checker_accuracy_on_true_images")
    if not all(isinstance(v, (int, float)) for v in q["minutes"].values()):
        raise ValueError(f"quality.json: minutes must map stage -> number, got {q['minutes']!r}")


def read_specialists(path: str | Path) -> dict | None:
    """The specialists' figures if that file exists (else None); a malformed one is an error."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), dict):
        raise ValueError(f"{p}: expected {{'tasks': {{task: {{metric: value}}}}, ...}}, got keys "
                         f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
    return obj


def goal_status(row: Mapping[str, Any]) -> str:
    """Issue 16's goal for RGB -> X: within 1.5x of the specialist's error, or >= 0.8x its score."""
    f, s = row.get("fourm"), row.get("specialist")
    if f is None or s is None:
        return "-"
    if row["higher_is_better"]:
        ratio = f / s if s else float("inf")
        return f"{ratio:.2f}x of specialist ({'met' if ratio >= 0.8 else 'not met'}, goal >= 0.8x)"
    ratio = f / s if s else float("inf")
    return f"{ratio:.2f}x specialist's error ({'met' if ratio <= 1.5 else 'not met'}, goal <= 1.5x)"


def rows_for_report(q: Mapping[str, Any]) -> list[dict]:
    """The table beside the report's pictures: one row per task and metric."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    out = []
    for task in TASKS:
        row = q["tasks"][task]
        out.append({"task": task, "metric": row["metric"] + (" (higher better)" if row["higher_is_better"]
                                                             else " (lower better)"),
                    **{s: fmt(row[s]) for s in SOURCES}, "vs specialist": goal_status(row)})
        for name in EXTRA.get(task, {}):
            sub = row[name]
            out.append({"task": "", "metric": name, **{s: fmt(sub[s]) for s in SOURCES}, "vs specialist": ""})
    cr = q["tasks"]["caption->rgb"]
    out.append({"task": "caption->rgb", "metric": "checker accuracy on true images (colours / counts)",
                "fourm": f"{fmt(cr['checker_accuracy_on_true_images'])} / "
                         f"{fmt(cr['count_match']['checker_accuracy_on_true_images'])}",
                "specialist": "", "tokenizer_ceiling": "", "mean_baseline": "",
                "vs specialist": f"judges only at >= {cr['checker_min_accuracy']:.0%}"})
    return out
