"""Generation quality on held-out procedural scenes, against mean baselines.

    figures = evaluate_scenes(generator, seed=0, start=1_000_000, num=64)
    print(format_figures(figures))

From each held-out scene's RGB alone (no chaining, so each figure is RGB -> X):
* depth: RMSE (metres) of the generated depth, decoded by the depth tokenizer, against the
  rendered depth; baselines: the training set's per-pixel mean depth map and its global mean;
  reference: the tokenizer's own round trip (the best the tokens can do).
* normals: mean angular error (degrees) of the decoded normals; baseline: the training set's
  per-pixel mean normal (renormalised); reference: the tokenizer round trip.
* captions: parsed object count == number of visible objects, and colour words naming only
  colours of visible objects (precision) / all of them (recall); chance: the majority object
  count of the training scenes, and a random colour's precision. The parser is validated on the
  ground-truth captions (reported as `parser_count_accuracy`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

from fourm.data import captions as captions_lib
from fourm.data import scenes as scenes_lib

_SHAPE_WORDS = {"sphere": "sphere", "ball": "sphere", "cube": "cube", "block": "cube",
                "cylinder": "cylinder", "cone": "cone"}
_ROOM_COLOURS = ("light blue", "pale green", "dark grey")  # wall / floor names containing object colours


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _number(word: str) -> int | None:
    if word in captions_lib.NUMBERS:
        return captions_lib.NUMBERS.index(word)
    return 1 if word in ("a", "an", "single") else None


def parse_count(caption: str) -> int | None:
    """Number of objects a caption states: 'N objects', else its noun phrases ('two red cubes
    and a sphere' = 3), plus 'N more objects'. Phrases with 'the' refer back and are not counted."""
    w = _words(caption)
    if "empty" in w:
        return 0
    more = sum(_number(w[i - 2]) or 0 for i in range(2, len(w))
               if w[i] in ("object", "objects") and w[i - 1] == "more")
    for i in range(1, len(w)):
        if w[i] == "objects" and w[i - 1] != "more" and _number(w[i - 1]) is not None:
            return _number(w[i - 1])
    total = 0
    for i, word in enumerate(w):
        singular = word[:-1] if word.endswith("s") and word[:-1] in _SHAPE_WORDS else word
        if singular not in _SHAPE_WORDS:
            continue
        # Walk back over adjectives to the determiner / number of this noun phrase.
        j = i - 1
        while j >= 0 and _number(w[j]) is None and w[j] not in ("the", "and", "of", "is", "with"):
            j -= 1
        if j < 0 or w[j] == "the":
            continue
        n = _number(w[j])
        total += n if n is not None else 1
    total += more
    return total or None


def parse_colours(caption: str) -> set[str]:
    """Object colour words in a caption (room colours such as 'light blue' walls excluded)."""
    text = caption.lower()
    for room in _ROOM_COLOURS:
        text = text.replace(room, " ")
    return set(_words(text)) & set(scenes_lib.COLOURS)


def angular_error_deg(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-8)
    t = true / np.maximum(np.linalg.norm(true, axis=-1, keepdims=True), 1e-8)
    return np.degrees(np.arccos(np.clip((p * t).sum(-1), -1.0, 1.0)))


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def _scenes(seed: int, start: int, num: int, resolution: int, workers: int) -> list[dict]:
    return list(scenes_lib.generate_scenes(seed, start, num, resolution=resolution, workers=workers))


def train_statistics(seed: int, num: int, resolution: int, workers: int = 1) -> dict[str, Any]:
    """Per-pixel mean depth and normal maps, and the object-count histogram of training scenes."""
    depth = np.zeros((resolution, resolution), np.float64)
    normals = np.zeros((resolution, resolution, 3), np.float64)
    counts: Counter = Counter()
    colours: Counter = Counter()
    for s in _scenes(seed, 0, num, resolution, workers):
        depth += s["depth"]
        normals += s["normals"]
        counts[len(s["boxes"])] += 1
        colours[len({b["colour"] for b in s["boxes"]})] += 1
    n = normals / max(num, 1)
    return {"mean_depth_map": depth / max(num, 1), "mean_depth": float(depth.mean() / max(num, 1)),
            "mean_normal_map": n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8),
            "count_hist": dict(counts), "distinct_colours_hist": dict(colours), "num": num}


def _names(spec, resolution: int) -> dict[str, str | None]:
    names = set(spec.names)
    pick = lambda n: n if n in names else None  # noqa: E731
    return {"rgb": pick(f"rgb@{resolution}"), "depth": pick(f"tok_depth@{resolution}"),
            "normals": pick(f"tok_normal@{resolution}"), "caption": pick("caption")}


def evaluate_scenes(generator, *, seed: int = 0, start: int = 1_000_000, num: int = 32,
                    resolution: int = 64, batch_size: int = 8, train_scenes: int = 256,
                    grid_target=None, caption_target=None, workers: int = 1,
                    stats: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate depth / normals / caption from the RGB of held-out scenes [start, start+num) and
    score them (see the module docstring). Targets the model or tokenizers lack are skipped."""
    from fourm.generate.chain import Target

    spec = generator.spec
    names = _names(spec, resolution)
    if names["rgb"] is None:
        raise ValueError(f"the model has no rgb@{resolution} input; its modalities: {list(spec.names)}")
    stats = stats or train_statistics(seed, train_scenes, resolution, workers)
    held = _scenes(seed, start, num, resolution, workers)
    grid_target = grid_target or Target("?", steps=8, temperature=0.0)
    caption_target = caption_target or Target("caption", temperature=0.0)
    acc = {k: [] for k in ("depth", "depth_base_map", "depth_base_mean", "depth_tok", "normals",
                            "normals_base", "normals_tok")}
    cap_rows = []
    toks = generator.image_tokenizers
    batches = range(0, num, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch")
    for i in batches:
        chunk = held[i:i + batch_size]
        rgb = np.stack([s["rgb"] for s in chunk])
        cond = {names["rgb"]: rgb}
        if names["depth"] and names["depth"] in toks:
            true = np.stack([s["depth"] for s in chunk])
            out = generator.generate(cond, [_named(grid_target, names["depth"])], seed=seed + i)
            acc["depth"].append(((out.decoded[names["depth"]] - true) ** 2).mean((1, 2)))
            acc["depth_base_map"].append(((stats["mean_depth_map"][None] - true) ** 2).mean((1, 2)))
            acc["depth_base_mean"].append(((stats["mean_depth"] - true) ** 2).mean((1, 2)))
            recon = toks[names["depth"]].decode(toks[names["depth"]].encode(true))
            acc["depth_tok"].append(((recon - true) ** 2).mean((1, 2)))
        if names["normals"] and names["normals"] in toks:
            true = np.stack([s["normals"] for s in chunk])
            out = generator.generate(cond, [_named(grid_target, names["normals"])], seed=seed + i)
            acc["normals"].append(angular_error_deg(out.decoded[names["normals"]], true).mean((1, 2)))
            acc["normals_base"].append(angular_error_deg(stats["mean_normal_map"][None], true).mean((1, 2)))
            recon = toks[names["normals"]].decode(toks[names["normals"]].encode(true))
            acc["normals_tok"].append(angular_error_deg(recon, true).mean((1, 2)))
        if names["caption"] and generator.text_tokenizer is not None:
            out = generator.generate(cond, [_named(caption_target, names["caption"])], seed=seed + i)
            for s, text in zip(chunk, out.text[names["caption"]]):
                cap_rows.append((s, text))
    return _figures(acc, cap_rows, stats, num)


def _named(target, name):
    import dataclasses

    return dataclasses.replace(target, name=name)


def _figures(acc, cap_rows, stats, num) -> dict[str, Any]:
    fig: dict[str, Any] = {"num_scenes": num, "train_scenes": stats["num"]}
    if acc["depth"]:
        cat = {k: np.concatenate(acc[k]) for k in ("depth", "depth_base_map", "depth_base_mean", "depth_tok")}
        fig["depth_rmse"] = float(np.sqrt(cat["depth"].mean()))
        fig["depth_rmse_mean_map_baseline"] = float(np.sqrt(cat["depth_base_map"].mean()))
        fig["depth_rmse_mean_baseline"] = float(np.sqrt(cat["depth_base_mean"].mean()))
        fig["depth_rmse_tokenizer_roundtrip"] = float(np.sqrt(cat["depth_tok"].mean()))
        fig["depth_vs_baseline"] = fig["depth_rmse"] / max(fig["depth_rmse_mean_map_baseline"], 1e-9)
    if acc["normals"]:
        cat = {k: np.concatenate(acc[k]) for k in ("normals", "normals_base", "normals_tok")}
        fig["normals_angle_deg"] = float(cat["normals"].mean())
        fig["normals_angle_mean_baseline_deg"] = float(cat["normals_base"].mean())
        fig["normals_angle_tokenizer_roundtrip_deg"] = float(cat["normals_tok"].mean())
        fig["normals_vs_baseline"] = fig["normals_angle_deg"] / max(fig["normals_angle_mean_baseline_deg"], 1e-9)
    if cap_rows:
        fig.update(caption_figures(cap_rows, stats))
    return fig


def caption_figures(rows: Sequence[tuple[dict, str]], stats: dict) -> dict[str, float]:
    """Count accuracy, colour precision/recall of generated captions (+ chance, parser check)."""
    count_ok, parser_ok, prec, rec, exact = [], [], [], [], []
    for scene, text in rows:
        true_n = len(scene["boxes"])
        true_c = {b["colour"] for b in scene["boxes"]}
        count_ok.append(parse_count(text) == true_n)
        parser_ok.append(parse_count(scene["caption"]) == true_n)
        got = parse_colours(text)
        prec.append(len(got & true_c) / len(got) if got else 0.0)
        rec.append(len(got & true_c) / len(true_c) if true_c else 1.0)
        exact.append(got == true_c)
    hist = stats["count_hist"]
    majority = max(hist, key=hist.get) if hist else 0
    chance_count = sum(len(s["boxes"]) == majority for s, _ in rows) / len(rows)
    n_colours = len(scenes_lib.COLOURS)
    chance_prec = float(np.mean([len({b["colour"] for b in s["boxes"]}) / n_colours for s, _ in rows]))
    return {"caption_count_accuracy": float(np.mean(count_ok)),
            "caption_count_chance_majority": float(chance_count),
            "caption_colour_precision": float(np.mean(prec)),
            "caption_colour_recall": float(np.mean(rec)),
            "caption_colour_exact": float(np.mean(exact)),
            "caption_colour_precision_chance": chance_prec,
            "parser_count_accuracy": float(np.mean(parser_ok)),
            "caption_examples": [t for _, t in rows[:3]]}


def format_figures(fig: dict[str, Any]) -> str:
    lines = [f"generation quality on {fig['num_scenes']} held-out scenes "
             f"(baselines from {fig['train_scenes']} training scenes):"]
    if "depth_rmse" in fig:
        lines.append(f"  depth RMSE {fig['depth_rmse']:.3f} m | mean-depth-map baseline "
                     f"{fig['depth_rmse_mean_map_baseline']:.3f} m | global-mean baseline "
                     f"{fig['depth_rmse_mean_baseline']:.3f} m | tokenizer round trip "
                     f"{fig['depth_rmse_tokenizer_roundtrip']:.3f} m | ratio to baseline "
                     f"{fig['depth_vs_baseline']:.2f}")
    if "normals_angle_deg" in fig:
        lines.append(f"  normals angular error {fig['normals_angle_deg']:.1f} deg | mean-normal "
                     f"baseline {fig['normals_angle_mean_baseline_deg']:.1f} deg | tokenizer round "
                     f"trip {fig['normals_angle_tokenizer_roundtrip_deg']:.1f} deg | ratio "
                     f"{fig['normals_vs_baseline']:.2f}")
    if "caption_count_accuracy" in fig:
        lines.append(f"  captions: object count right {fig['caption_count_accuracy']:.0%} (chance, "
                     f"majority count: {fig['caption_count_chance_majority']:.0%}); colour precision "
                     f"{fig['caption_colour_precision']:.0%} (chance {fig['caption_colour_precision_chance']:.0%}),"
                     f" recall {fig['caption_colour_recall']:.0%}, exact set "
                     f"{fig['caption_colour_exact']:.0%}; parser on true captions "
                     f"{fig['parser_count_accuracy']:.0%}")
        for t in fig["caption_examples"]:
            lines.append(f"    e.g. {t!r}")
    return "\n".join(lines)
