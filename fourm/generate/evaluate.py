"""Generation quality on held-out procedural scenes, against tokenizer ceilings and mean baselines.

    figures = evaluate_scenes(generator, seed=0, start=1_000_000, num=64)
    print(format_figures(figures))

From each held-out scene's RGB alone (no chaining, so each figure is RGB -> X), and from each
scene's true caption (caption -> RGB), with the metrics of `fourm.quality.metrics`:
* depth: AbsRel and RMSE (metres) of the decoded depth;
* normals: mean angular error (degrees);
* segmentation: mIoU and pixel accuracy;
* captions: object count accuracy, colour and shape precision / recall (parsed back from the text;
  the parser is validated on the true captions: `parser_count_accuracy`);
* caption -> RGB: the checker (`fourm.quality.checker`) on the generated image against the caption:
  colour_match, count_match; the checker's own accuracy on the true images is reported beside
  (a figure the checker is not >= 95% right about on true images is not a judgement).
Each task also gets its tokenizer's ceiling (the true target through tokenize -> detokenize, scored
by the same metric: the best the model's tokens can do) and a mean baseline from the training
scenes (per-pixel mean depth / normal map, per-pixel most frequent class, the majority caption
facts, the mean training image). Targets the model or its tokenizers lack are skipped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

import numpy as np

from fourm.data import scenes as scenes_lib
from fourm.quality import checker as checker_lib
from fourm.quality import metrics as M
from fourm.quality.captions import parse_colours, parse_count  # noqa: F401  (public here too)
from fourm.quality.metrics import angular_error_deg  # noqa: F401

DENSE = ("depth", "normals", "semseg")


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def _scenes(seed: int, start: int, num: int, resolution: int, workers: int) -> list[dict]:
    return list(scenes_lib.generate_scenes(seed, start, num, resolution=resolution, workers=workers,
                                           progress=False))


def train_statistics(seed: int, num: int, resolution: int, workers: int = 1) -> dict[str, Any]:
    """Mean baselines from training scenes [0, num): per-pixel mean depth / normal / RGB, per-pixel
    class histogram, and the histograms of object counts, colours and shapes."""
    depth = np.zeros((resolution, resolution), np.float64)
    normals = np.zeros((resolution, resolution, 3), np.float64)
    rgb = np.zeros((resolution, resolution, 3), np.float64)
    classes = np.zeros((resolution, resolution, scenes_lib.NUM_CLASSES), np.int64)
    counts, colours, shapes = Counter(), Counter(), Counter()
    rows = np.arange(resolution)[:, None]
    for s in _scenes(seed, 0, num, resolution, workers):
        depth += s["depth"]
        normals += s["normals"]
        rgb += s["rgb"]
        classes[rows, np.arange(resolution)[None, :], s["semseg"]] += 1
        counts[len(s["boxes"])] += 1
        colours.update({b["colour"] for b in s["boxes"]})
        shapes.update({b["class"] for b in s["boxes"]})
    n = max(num, 1)
    nm = normals / n
    return {"mean_depth_map": depth / n, "mean_depth": float(depth.mean() / n),
            "mean_normal_map": nm / np.maximum(np.linalg.norm(nm, axis=-1, keepdims=True), 1e-8),
            "mean_rgb": np.round(rgb / n).astype(np.uint8), "mode_class_map": classes.argmax(-1),
            "count_hist": dict(counts), "colour_hist": dict(colours), "shape_hist": dict(shapes),
            "num": num}


def majority_facts(stats: dict) -> M.CaptionFacts:
    """The caption baseline: the most frequent object count, colour and shape of training."""
    top = lambda h: frozenset([max(h, key=h.get)]) if h else frozenset()  # noqa: E731
    hist = stats["count_hist"]
    return M.CaptionFacts(max(hist, key=hist.get) if hist else 0, top(stats["colour_hist"]),
                          top(stats["shape_hist"]))


def _names(spec, resolution: int) -> dict[str, str | None]:
    names = set(spec.names)
    pick = lambda n: n if n in names else None  # noqa: E731
    return {"rgb": pick(f"rgb@{resolution}"), "depth": pick(f"tok_depth@{resolution}"),
            "normals": pick(f"tok_normal@{resolution}"), "semseg": pick(f"tok_semseg@{resolution}"),
            "tok_rgb": pick(f"tok_rgb@{resolution}"), "caption": pick("caption")}


def _named(target, name):
    return dataclasses.replace(target, name=name)


def _labels(x) -> np.ndarray:
    x = np.asarray(x)
    return x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x


class _Acc:
    """Per-image values of (task, source, metric), plus confusion matrices for segmentation."""

    def __init__(self):
        self.v: dict[tuple, list] = {}
        self.conf: dict[str, list] = {}

    def add(self, task, source, metric, values):
        self.v.setdefault((task, source, metric), []).append(np.asarray(values, np.float64))

    def add_semseg(self, source, pred, true):
        c, rows = M.confusion(_labels(pred), true)
        old = self.conf.get(source)
        self.conf[source] = [c, rows] if old is None else [old[0] + c, old[1] + rows]

    def mean(self, key) -> float:
        return float(np.concatenate(self.v[key]).mean())


def _score_dense(acc: _Acc, source: str, task: str, pred, true) -> None:
    if task == "depth":
        acc.add(task, source, "abs_rel", M.abs_rel(pred, true))
        acc.add(task, source, "sq", M.squared_error(pred, true))
    elif task == "normals":
        acc.add(task, source, "angle", M.mean_angle_deg(pred, true))
    else:
        acc.add_semseg(source, pred, true)


def evaluate_scenes(generator, *, seed: int = 0, start: int = 1_000_000, num: int = 32,
                    resolution: int = 64, batch_size: int = 8, train_scenes: int = 256,
                    grid_target=None, caption_target=None, rgb_target=None, workers: int = 1,
                    stats: dict | None = None, checker_scenes: int = 200,
                    progress: bool = True) -> dict[str, Any]:
    """Generate depth / normals / segmentation / caption from the RGB of held-out scenes
    [start, start+num), and RGB from their captions; score them (module docstring). The checker
    is validated on `checker_scenes` further held-out scenes [start+num, ...)."""
    from fourm.generate.chain import Target

    spec = generator.spec
    names = _names(spec, resolution)
    if names["rgb"] is None:
        raise ValueError(f"the model has no rgb@{resolution} input; its modalities: {list(spec.names)}")
    stats = stats or train_statistics(seed, train_scenes, resolution, workers)
    held = _scenes(seed, start, num, resolution, workers)
    grid_target = grid_target or Target("?", steps=8, temperature=0.0)
    rgb_target = rgb_target or grid_target
    caption_target = caption_target or Target("caption", temperature=0.0)
    toks, text_tok = generator.image_tokenizers, generator.text_tokenizer
    base = {"depth": stats["mean_depth_map"], "normals": stats["mean_normal_map"],
            "semseg": stats["mode_class_map"]}
    acc, captions, images = _Acc(), [], []
    batches = range(0, num, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch")
    for i in batches:
        chunk = held[i:i + batch_size]
        cond = {names["rgb"]: np.stack([s["rgb"] for s in chunk])}
        for task in DENSE:
            name = names[task]
            if not (name and name in toks):
                continue
            true = np.stack([s[task] for s in chunk])
            out = generator.generate(cond, [_named(grid_target, name)], seed=seed + i)
            _score_dense(acc, "fourm", task, out.decoded[name], true)
            _score_dense(acc, "tokenizer_ceiling", task, toks[name].decode(toks[name].encode(true)), true)
            _score_dense(acc, "mean_baseline", task, np.broadcast_to(base[task], true.shape), true)
            if task == "depth":  # the old global-mean baseline, for continuity of the figures
                acc.add(task, "global_mean", "sq", M.squared_error(np.full(true.shape, stats["mean_depth"]), true))
        if names["caption"] and text_tok is not None:
            out = generator.generate(cond, [_named(caption_target, names["caption"])], seed=seed + i)
            captions += out.text[names["caption"]]
            if names["tok_rgb"] and names["tok_rgb"] in toks:
                out = generator.generate({names["caption"]: [s["caption"] for s in chunk]},
                                         [_named(rgb_target, names["tok_rgb"])], seed=seed + i)
                images += list(out.decoded[names["tok_rgb"]])
    fig: dict[str, Any] = {"num_scenes": num, "train_scenes": stats["num"]}
    fig.update(_dense_figures(acc))
    if captions:
        fig.update(caption_figures(list(zip(held, captions)), stats, text_tok))
    if images:
        rgb_tok = toks[names["tok_rgb"]]
        true_rgb = np.stack([s["rgb"] for s in held])
        fig.update(caption_to_rgb_figures(held, images, rgb_tok.decode(rgb_tok.encode(true_rgb)), stats,
                                          _scenes(seed, start + num, checker_scenes, resolution, workers)))
    return fig


def _dense_figures(acc: _Acc) -> dict[str, float]:
    fig = {}
    suffix = {"fourm": "", "tokenizer_ceiling": "_tokenizer_roundtrip", "mean_baseline": "_mean_map_baseline"}
    for source, sfx in suffix.items():
        if ("depth", source, "abs_rel") in acc.v:
            fig[f"depth_abs_rel{sfx}"] = acc.mean(("depth", source, "abs_rel"))
            fig[f"depth_rmse{sfx}"] = float(np.sqrt(acc.mean(("depth", source, "sq"))))
        if ("normals", source, "angle") in acc.v:
            key = "normals_angle_deg" if source == "fourm" else f"normals_angle{sfx}_deg"
            fig[key] = acc.mean(("normals", source, "angle"))
        if source in acc.conf:
            s = M.segmentation_scores(*acc.conf[source])
            fig[f"semseg_miou{sfx}"], fig[f"semseg_pixel_acc{sfx}"] = s["miou"], s["pixel_acc"]
    if ("depth", "global_mean", "sq") in acc.v:
        fig["depth_rmse_mean_baseline"] = float(np.sqrt(acc.mean(("depth", "global_mean", "sq"))))
    return fig


def caption_figures(rows: Sequence[tuple[dict, str]], stats: dict, text_tokenizer=None) -> dict[str, Any]:
    """Count accuracy, colour / shape precision and recall of generated captions, against the
    majority-facts baseline and (with the text tokenizer) the true captions' round trip."""
    scenes = [s for s, _ in rows]
    fig = {"parser_count_accuracy": M.caption_scores([M.CaptionFacts.of_text(s["caption"]) for s in scenes],
                                                     scenes)["count_acc"]}
    sources = {"": [M.CaptionFacts.of_text(t) for _, t in rows],
               "_majority_baseline": [majority_facts(stats)] * len(rows)}
    if text_tokenizer is not None:
        sources["_tokenizer_roundtrip"] = [M.CaptionFacts.of_text(text_tokenizer.decode(
            text_tokenizer.encode(s["caption"]))) for s in scenes]
    for sfx, preds in sources.items():
        for k, v in M.caption_scores(preds, scenes).items():
            fig[f"caption_{k}{sfx}"] = v
    fig["caption_count_accuracy"] = fig.pop("caption_count_acc")  # the figure's historical name
    fig["caption_examples"] = [t for _, t in rows[:3]]
    return fig


def caption_to_rgb_figures(held: Sequence[dict], images: Sequence[np.ndarray], roundtrip: np.ndarray,
                           stats: dict, checker_scenes: Sequence[dict]) -> dict[str, float]:
    """The checker's verdicts on generated images, on the RGB tokenizer's round trip of the true
    images (the ceiling) and on the mean training image (the baseline); and the checker's own
    accuracy on true images it was not tuned on."""
    caps = [s["caption"] for s in held]
    fig = {}
    for sfx, imgs in (("", images), ("_tokenizer_roundtrip", list(roundtrip)),
                      ("_mean_baseline", [stats["mean_rgb"]] * len(caps))):
        j = checker_lib.judge(imgs, caps)
        fig[f"caption_rgb_colour_match{sfx}"] = j["colour_match"]
        fig[f"caption_rgb_count_match{sfx}"] = j["count_match"]
        fig[f"caption_rgb_colour_recall{sfx}"] = j["colour_recall"]
    if checker_scenes:
        v = checker_lib.validate(checker_scenes)
        fig["checker_colour_accuracy_true"] = v["colour_accuracy"]
        fig["checker_count_accuracy_true"] = v["count_accuracy"]
        fig["checker_rejects_wrong_colours"] = v["rejects_wrong_colours"]
        fig["checker_true_scenes"] = v["num"]
    return fig


def format_figures(fig: dict[str, Any]) -> str:
    g = lambda k, f="{:.3f}": f.format(fig[k]) if k in fig else "-"  # noqa: E731
    lines = [f"generation quality on {fig['num_scenes']} held-out scenes "
             f"(baselines from {fig['train_scenes']} training scenes); "
             f"model | tokenizer round trip | mean baseline:"]
    if "depth_rmse" in fig:
        lines.append(f"  depth RMSE {g('depth_rmse')} | {g('depth_rmse_tokenizer_roundtrip')} | "
                     f"{g('depth_rmse_mean_map_baseline')} m; AbsRel {g('depth_abs_rel')} | "
                     f"{g('depth_abs_rel_tokenizer_roundtrip')} | {g('depth_abs_rel_mean_map_baseline')}")
    if "normals_angle_deg" in fig:
        f1 = "{:.1f}"
        lines.append(f"  normals angular error {g('normals_angle_deg', f1)} | "
                     f"{g('normals_angle_tokenizer_roundtrip_deg', f1)} | "
                     f"{g('normals_angle_mean_map_baseline_deg', f1)} deg")
    if "semseg_miou" in fig:
        lines.append(f"  segmentation mIoU {g('semseg_miou')} | {g('semseg_miou_tokenizer_roundtrip')} | "
                     f"{g('semseg_miou_mean_map_baseline')}; pixel accuracy {g('semseg_pixel_acc')} | "
                     f"{g('semseg_pixel_acc_tokenizer_roundtrip')} | {g('semseg_pixel_acc_mean_map_baseline')}")
    if "caption_count_accuracy" in fig:
        p = "{:.0%}"
        lines.append(f"  captions: object count right {g('caption_count_accuracy', p)} | "
                     f"{g('caption_count_acc_tokenizer_roundtrip', p)} | "
                     f"{g('caption_count_acc_majority_baseline', p)}; colour precision "
                     f"{g('caption_colour_precision', p)}, recall {g('caption_colour_recall', p)}; "
                     f"shape precision {g('caption_shape_precision', p)}, recall "
                     f"{g('caption_shape_recall', p)}; parser on true captions {g('parser_count_accuracy', p)}")
        for t in fig.get("caption_examples", []):
            lines.append(f"    e.g. {t!r}")
    if "caption_rgb_colour_match" in fig:
        p = "{:.0%}"
        lines.append(f"  caption -> RGB (checker): colours right {g('caption_rgb_colour_match', p)} | "
                     f"{g('caption_rgb_colour_match_tokenizer_roundtrip', p)} | "
                     f"{g('caption_rgb_colour_match_mean_baseline', p)}; caption colours seen "
                     f"{g('caption_rgb_colour_recall', p)} | {g('caption_rgb_colour_recall_tokenizer_roundtrip', p)} | "
                     f"{g('caption_rgb_colour_recall_mean_baseline', p)}; counts right "
                     f"{g('caption_rgb_count_match', p)} | {g('caption_rgb_count_match_tokenizer_roundtrip', p)} | "
                     f"{g('caption_rgb_count_match_mean_baseline', p)}; checker on true images: colours "
                     f"{g('checker_colour_accuracy_true', p)}, counts {g('checker_count_accuracy_true', p)}")
    return "\n".join(lines)
