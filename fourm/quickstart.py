"""The whole system in one command: scenes -> tokenizers -> pre-tokenize -> pretrain -> generate.

Each stage is a function of the quickstart config that writes into `workdir/<stage>/` and ends by
writing `workdir/<stage>/DONE.json` (atomically, with its figures and wall time). A stage whose
DONE.json exists is skipped; an unfinished one is re-entered, and the stages underneath resume
(tokenizer/model training from their orbax checkpoints, pre-tokenization shard by shard).
The report stage also writes `workdir/quality.json` (fourm.quality.table): per task the model's
figure beside its tokenizer's ceiling, a mean baseline and, when `workdir/specialists.json`
exists (python -m fourm.bench.specialists --data WORKDIR), the single-task specialist's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import ml_collections

from fourm.io import atomic_write_json
from fourm.quality import table as quality_table

IMAGE_TOKENIZERS = {  # scene field -> (recipe, modality of the tokens)
    "rgb": ("rgb", "tok_rgb@64"),
    "depth": ("depth", "tok_depth@64"),
    "normals": ("normals", "tok_normal@64"),
    "semseg": ("semseg", "tok_semseg@64"),
}
MODALITIES = ["rgb@64", "tok_rgb@64", "tok_depth@64", "tok_normal@64", "tok_semseg@64", "caption"]


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, default=float)


def stage_dir(cfg, name: str) -> Path:
    return Path(cfg.workdir) / name


def run_stage(cfg, name: str, fn: Callable[[ml_collections.ConfigDict, Path], dict], log=print) -> dict:
    out = stage_dir(cfg, name)
    done = out / "DONE.json"
    if done.exists():
        log(f"[quickstart] {name}: cached ({done})")
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    log(f"[quickstart] {name}: running")
    t0 = time.perf_counter()
    result = dict(fn(cfg, out) or {})
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    _write_json(done, result)
    log(f"[quickstart] {name}: done in {result['wall_s']:.1f} s")
    return result


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def stage_scenes(cfg, out: Path) -> dict:
    """Held-out scenes as an aligned folder (the user-facing format) and the viewer grid."""
    from fourm.data import folder, scenes
    from fourm.data.viewer import show  # noqa: F401  (the same code path as `fourm-scenes show`)

    samples = scenes.generate_scenes(cfg.seed, cfg.heldout_start, cfg.heldout_scenes,
                                      resolution=cfg.resolution, workers=cfg.num_workers)
    folder.write_dataset(out / "heldout", samples, resolution=cfg.resolution)
    show(out / "heldout", num=min(8, cfg.heldout_scenes), out=out / "grid.png")
    return {"heldout_dir": str(out / "heldout"), "grid": str(out / "grid.png")}


def _tokenizer_config(cfg, recipe: str, out: Path):
    from fourm.config import REPO_ROOT, load_config

    tc = load_config(str(REPO_ROOT / "tokenizers" / f"{recipe}.py") + ":" + cfg.tokenizer_recipe_opts)
    tc.seed = cfg.seed
    tc.workdir = str(out / recipe)
    tc.data.seed = cfg.seed
    tc.data.train_start, tc.data.train_num = 0, int(cfg.train_scenes)
    tc.data.eval_start, tc.data.eval_num = int(cfg.heldout_start), int(cfg.heldout_scenes)
    tc.data.cache_dir = str(Path(cfg.workdir) / "cache")
    tc.num_workers = cfg.num_workers
    # The recipes warm up over 100 of their 1500 steps; keep that fraction for shorter runs.
    steps = int(cfg.tokenizer_steps[recipe])
    tc.train.warmup_steps = min(int(tc.train.warmup_steps), max(1, steps // 15))
    # Cadences follow the run's length, not the recipe's (the `tiny` recipe saves a checkpoint
    # and a PNG every 2 steps, which made the smoke profile's 30-step runs 2.5x longer): a
    # reconstruction PNG at the end, ~10 log lines, a checkpoint every half (a killed run resumes).
    tc.train.image_every = steps
    tc.train.log_every = max(1, steps // 10)
    tc.train.ckpt_every = max(1, steps // 2)
    # One device: these small convnets train ~10% faster (smoke: ~2x) without simulated devices'
    # all-reduces on 2 cores; the model pretraining runs on `config.num_devices`.
    tc.train.devices = 1
    return tc


def stage_tokenizers(cfg, out: Path) -> dict:
    """The four VQ tokenizers (rgb, depth, normals, semseg) and the SentencePiece text tokenizer."""
    from fourm.tokenizers import train as tok_train

    figures = {}
    for field, (recipe, _) in IMAGE_TOKENIZERS.items():
        tc = _tokenizer_config(cfg, recipe, out)
        result = tok_train.train(tc, workdir=tc.workdir, steps=int(cfg.tokenizer_steps[recipe]))
        figures[field] = {k: v for k, v in result.get("eval", {}).items() if isinstance(v, (int, float))}
    figures["text"] = _train_text_tokenizer(cfg, out / "text")
    return figures


def _train_text_tokenizer(cfg, out: Path) -> dict:
    from fourm.config import REPO_ROOT, load_config
    from fourm.tokenizers.corpus import corpus
    from fourm.tokenizers.text import TextTokenizer

    tc = load_config(str(REPO_ROOT / "tokenizers" / "text.py"))
    tc.vocab_size = int(cfg.text_vocab)
    tc.scenes.seed, tc.scenes.start, tc.scenes.count = cfg.seed, 0, int(cfg.train_scenes)
    tc.out_dir = str(out)
    tc.workers = cfg.num_workers
    texts = corpus(tc)
    tok = TextTokenizer.train(texts, out, tc)
    lengths = [len(tok.encode(t)) for t in texts[:500]]
    return {"vocab_size": tok.vocab_size, "texts": len(texts),
            "tokens_per_caption_mean": sum(lengths) / max(1, len(lengths))}


def stage_pretokenize(cfg, out: Path) -> dict:
    from fourm.config import load_config
    from fourm.tokenizers import load as load_image_tokenizer
    from fourm.tokenizers.pretokenize import pretokenize
    from fourm.tokenizers.sources import make_source
    from fourm.tokenizers.text import TextTokenizer

    tok_root = stage_dir(cfg, "tokenizers")
    image_paths = {mod: str(tok_root / recipe) for recipe, mod in IMAGE_TOKENIZERS.values()}
    image_toks = {m: load_image_tokenizer(p, modality=m) for m, p in image_paths.items()}
    text_tok = TextTokenizer.load(tok_root / "text")
    figures = {}
    for split, start, count in (("train", 0, cfg.train_scenes),
                                ("heldout", cfg.heldout_start, cfg.heldout_scenes)):
        pc = load_config("pretokenize" + (":eval" if split == "heldout" else ""))
        pc.source.seed, pc.source.start, pc.source.count = cfg.seed, int(start), int(count)
        source = make_source(pc.source)
        manifest = pretokenize(
            source, out / split, modalities=MODALITIES, image_tokenizers=image_toks,
            text_tokenizer=text_tok, tokenizer_paths=dict(image_paths, text=str(tok_root / "text")),
            shard_size=max(64, int(count) // 4), batch_size=64, workers=cfg.num_workers,
            source_info=source.info(), default_size=cfg.resolution)
        figures[split] = {"samples": manifest["num_records"],
                          "samples_per_s": manifest["benchmark"]["samples_per_second"]}
    return figures


def pretrain_config(cfg):
    from fourm.config import load_config

    pc = load_config(f"pretrain:{cfg.pretrain_variant}")
    pc.seed = cfg.seed
    pc.workdir = str(stage_dir(cfg, "pretrain"))
    pc.data.dir = str(stage_dir(cfg, "pretokenize") / "train")
    pc.data.eval_dir = str(stage_dir(cfg, "pretokenize") / "heldout")
    pc.model.modalities = list(MODALITIES)
    pc.num_train_steps = int(cfg.pretrain_steps)
    pc.batch_size = int(cfg.pretrain_batch)
    pc.eval_every = max(1, int(cfg.pretrain_steps) // 2)
    pc.ckpt_every = max(1, int(cfg.pretrain_steps) // 4)
    return pc


def stage_pretrain(cfg, out: Path) -> dict:
    from fourm.train.trainer import train

    pc = pretrain_config(cfg)
    result = train(pc, workdir=str(out))
    return {"step": result.step, "last_metrics": result.last_metrics}


def load_generator(cfg, loop: str = "auto"):
    """The pretrained model and the trained tokenizers of a quickstart workdir as a `Generator`.

    `loop="auto"`: MaskGIT steps at a few bucketed shapes (`fourm.generate.stepwise`): a few
    small programs to compile, shared by every step and target of the same shapes, and little
    padding to run (the quickstart and the notebooks generate a handful of batches, so compile
    time matters as much as run time)."""
    from fourm.generate.chain import Generator
    from fourm.model.pretrained import load_pretrained
    from fourm.tokenizers import load as load_image_tokenizer
    from fourm.tokenizers.text import TextTokenizer

    model = load_pretrained(stage_dir(cfg, "pretrain") / "export")
    tok_root = stage_dir(cfg, "tokenizers")
    toks = {mod: load_image_tokenizer(tok_root / recipe, modality=mod)
            for recipe, mod in IMAGE_TOKENIZERS.values()}
    toks["caption"] = TextTokenizer.load(tok_root / "text")
    return Generator(model, toks, loop=loop)


def stage_generate(cfg, out: Path) -> dict:
    """Held-out RGB -> depth, normals, segmentation, caption; caption -> RGB; quality figures."""
    import numpy as np

    from fourm.data import scenes, visualize
    from fourm.generate import evaluate as gen_eval
    from fourm.generate.defaults import grid_target, text_target
    from fourm.runtime import CompileTimer

    gen = load_generator(cfg)
    held = list(scenes.generate_scenes(cfg.seed, cfg.heldout_start, cfg.num_generate,
                                       resolution=cfg.resolution, workers=1, progress=False))
    rgb = np.stack([s["rgb"] for s in held])
    # fourm's default sampling (greedy), as fourm-generate's: RGB given -> one step per grid;
    # caption -> RGB with `maskgit_steps` MaskGIT steps.
    steps = int(cfg.maskgit_steps)
    targets = [grid_target("tok_depth@64", rgb_given=True), grid_target("tok_normal@64", rgb_given=True),
               grid_target("tok_semseg@64", rgb_given=True),
               text_target("caption", max_new_tokens=int(cfg.caption_tokens))]
    t0 = time.perf_counter()
    with CompileTimer() as compiled:
        res = gen.generate({"rgb@64": rgb}, targets, seed=cfg.seed)
    wall = time.perf_counter() - t0
    print(f"[quickstart] RGB -> depth, normals, semseg, caption: {wall:.1f} s "
          f"(compile {compiled.seconds:.1f} s, run {wall - compiled.seconds:.1f} s)")
    rows = []
    for i, s in enumerate(held):
        rows.append([s["rgb"],
                     visualize.colorize_depth(s["depth"]),
                     visualize.colorize_depth(res.decoded["tok_depth@64"][i], vmin=float(s["depth"].min()),
                                              vmax=float(s["depth"].max())),
                     visualize.colorize_normals(s["normals"]),
                     visualize.colorize_normals(res.decoded["tok_normal@64"][i]),
                     visualize.colorize_semseg(s["semseg"]),
                     visualize.colorize_semseg(res.decoded["tok_semseg@64"][i])])
    captions = [f"true: {s['caption']}\ngenerated: {c}" for s, c in zip(held, res.text["caption"])]
    visualize.save_png(out / "rgb_to_all.png", visualize.make_grid(
        rows, captions=captions, col_titles=["rgb (input)", "depth", "depth gen", "normals",
                                             "normals gen", "semseg", "semseg gen"]))
    # caption -> RGB (the other direction), through the RGB tokenizer's decoder.
    cap = gen.generate({"caption": [s["caption"] for s in held]},
                       [grid_target("tok_rgb@64", steps=steps)], seed=cfg.seed)
    visualize.save_png(out / "caption_to_rgb.png", visualize.make_grid(
        [[s["rgb"], cap.decoded["tok_rgb@64"][i]] for i, s in enumerate(held)],
        captions=[s["caption"] for s in held], col_titles=["true rgb", "generated from caption"]))
    figures = gen_eval.evaluate_scenes(
        gen, seed=cfg.seed, start=cfg.heldout_start, num=int(cfg.heldout_scenes),
        resolution=cfg.resolution, batch_size=8, train_scenes=min(256, int(cfg.train_scenes)),
        grid_target=grid_target("?", rgb_given=True), rgb_target=grid_target("?", steps=steps),
        caption_target=text_target("caption", max_new_tokens=int(cfg.caption_tokens)),
        checker_scenes=int(cfg.checker_scenes), progress=False)
    print(gen_eval.format_figures(figures))
    return {"figures": figures, "captions": captions,
            "seconds": {k: float(v) for k, v in res.seconds.items()},
            "compile_seconds": round(compiled.seconds, 2), "generate_seconds": round(wall, 2)}


def stage_report(cfg, out: Path) -> dict:
    """report.html + loss curves from the stages' figures and pictures."""
    from fourm import report

    root = Path(cfg.workdir)
    done = {n: json.loads((root / n / "DONE.json").read_text())
            for n in ("scenes", "tokenizers", "pretokenize", "pretrain", "generate")
            if (root / n / "DONE.json").exists()}
    sections = []
    sections.append(("Pipeline", report.table_html(
        [{"stage": n, "wall s": d.get("wall_s", "")} for n, d in done.items()])))
    sections.append(("Held-out scenes", report.img_html("scenes/grid.png", "the viewer: a row per scene")))
    tok_rows, imgs = [], []
    for field, (recipe, _) in IMAGE_TOKENIZERS.items():
        fig = {k: v for k, v in done.get("tokenizers", {}).get(field, {}).items()
               if isinstance(v, (int, float))}
        usage = ("codebook_usage_pct", "codes_used", "perplexity", "vocab_size", "step", "num_images")
        quality = ", ".join(f"{k} {v:.4g}" for k, v in fig.items()
                            if k not in usage and k not in ("tokens", "invalid_pixels"))
        tok_rows.append({"tokenizer": field, "quality": quality, **{k: fig[k] for k in usage if k in fig}})
        for p in sorted((root / "tokenizers" / recipe).glob("**/*.png"))[-1:]:
            imgs.append(report.img_html(str(p.relative_to(root)), f"{field}: input | reconstruction"))
    sections.append(("Tokenizers (held-out)", report.table_html(tok_rows) + "".join(imgs)))
    curves = {}
    metrics = [m for m in report.read_jsonl(root / "pretrain" / "metrics.jsonl")
               if m.get("split", "train") == "train" and "step" in m]
    for key in sorted({k for m in metrics for k in m if k == "loss" or k.startswith("loss/")}):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            curves[key] = tuple(zip(*pts))
    report.plot_curves(curves, out / "loss.png", title="pretraining loss", log_y=True)
    sections.append(("Pretraining", report.img_html("report/loss.png", "training loss per modality")))
    g = done.get("generate", {})
    figs = g.get("figures", {})
    quality = write_quality(cfg, done)
    sections.append(("Generation on held-out scenes",
                     report.img_html("generate/rgb_to_all.png", "RGB -> depth, normals, segmentation, caption")
                     + report.img_html("generate/caption_to_rgb.png", "caption -> RGB")
                     + "<h3>Quality: the model beside single-task specialists (quality.json)</h3>"
                     + report.table_html(quality_table.rows_for_report(quality))
                     + "<p>specialist: <code>python -m fourm.bench.specialists --data WORKDIR --minutes M"
                     "</code> writes specialists.json, read here if present ('-' where not measured)</p>"
                     + report.table_html([{"figure": k, "value": v} for k, v in figs.items()
                                          if isinstance(v, (int, float))])))
    path = report.write_report(root / "report.html", "fourm quickstart", sections)
    return {"report": str(path), "quality": str(root / "quality.json")}


def write_quality(cfg, done: dict) -> dict:
    """`workdir/quality.json` (fourm.quality.table's schema) from the generation figures, the
    stages' wall times and, if `workdir/specialists.json` exists, the specialists' figures."""
    root = Path(cfg.workdir)
    minutes = {n: d.get("wall_s", 0.0) / 60 for n, d in done.items() if n in quality_table.STAGE_NAMES}
    q = quality_table.build(done.get("generate", {}).get("figures", {}), minutes,
                            quality_table.read_specialists(root / "specialists.json"))
    quality_table.check_schema(q)
    _write_json(root / "quality.json", q)
    return q


STAGES = (("scenes", stage_scenes), ("tokenizers", stage_tokenizers),
          ("pretokenize", stage_pretokenize), ("pretrain", stage_pretrain),
          ("generate", stage_generate), ("report", stage_report))


class WorkdirMismatchError(ValueError):
    """The workdir's cached stages were made with another quickstart config."""


def write_config(cfg) -> Path:
    """`workdir/config.json`: the resolved config the cached stages belong to. Reusing a workdir
    with a config that differs (other than in `workdir` itself) is an error naming the fields,
    since cached stages of one profile must never mix with another's."""
    from fourm.config import to_json

    path = Path(cfg.workdir) / "config.json"
    new = json.loads(to_json(cfg))
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(new)
                      if k != "workdir" and old.get(k) != new.get(k))
        if diff:
            raise WorkdirMismatchError(
                f"{path}: this workdir was made with another quickstart config (differs in "
                + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                + "); pass another --config.workdir or delete the folder")
    return atomic_write_json(path, new)


def run(cfg) -> dict:
    write_config(cfg)
    results = {}
    for name, fn in STAGES:
        results[name] = run_stage(cfg, name, fn)
    print(f"[quickstart] report: {Path(cfg.workdir) / 'report.html'}")
    return results
