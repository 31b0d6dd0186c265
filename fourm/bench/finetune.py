"""Does pretraining pay? Fine-tuning and the encoder as a backbone vs training from scratch.

    python -m fourm.bench.finetune [--quick] [--json OUT] [--workdir DIR] [--set pretrain_steps=800]
    fourm-bench --only finetune          # the same, as a suite group (config: configs/bench.py)

All on scene shards made with `fourm.bench.shards` (patch-quantizer tokens: exact functions of the
images, so cross-modal prediction is learnable in minutes); the held-out scenes come from another
scene-generator seed.

1. Pretrain the real trainer on rgb@64 (pixels) + tok_rgb@64 + tok_depth@64 (4M masking).
2. Fine-tuning: a new modality, tok_normal@64, as the task rgb -> normals. The same trainer
   config runs from the pretrained export (`config.init.checkpoint`; the normals' embeddings and
   head are new) and from scratch, for the same steps; figures: held-out loss and token accuracy
   of tok_normal@64 (the trainer's eval on the held-out shards).
3. Backbone: per-patch semantic class (the majority class of each 8x8 patch, 8 classes) from
   rgb through `fourm.backbone`: a linear probe and a full fine-tune on the pretrained encoder vs
   the same head on a randomly initialised encoder; held-out accuracy.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np

from flax import nnx

from fourm import backbone
from fourm.bench.shards import PatchQuantizer, make_scene_shards
from fourm.config import load_config
from fourm.data.scenes import generate_scenes
from fourm.model import build_model
from fourm.train import trainer
from fourm.train.metrics import read_jsonl

PRETRAIN_MODALITIES = ("rgb@64", "tok_rgb@64", "tok_depth@64")
NEW = "tok_normal@64"
HELDOUT_SEED = 1  # the train shards use scene seed 0


def default_config(quick: bool = False) -> ml_collections.ConfigDict:
    """The `finetune` section of configs/bench.py (quick: its smoke-test sizes)."""
    return load_config("bench:quick" if quick else "bench").finetune


def _train_config(f, data_dir, eval_dir, workdir, modalities, steps, extra=()):
    c = load_config("pretrain:smoke", [
        f"data.dir={data_dir}", f"data.eval_dir={eval_dir}", f"workdir={workdir}",
        f"model.dim={f.dim}", f"model.encoder_depth={f.depth}", f"model.decoder_depth={f.depth}",
        f"model.num_heads={f.heads}", f"model.modalities={json.dumps(list(modalities))}",
        "masking.input_budget=64", "masking.target_budget=64", f"batch_size={f.batch}",
        f"optim.lr={f.lr}", f"optim.warmup_steps={max(1, steps // 10)}", f"num_train_steps={steps}",
        f"log_every={max(1, steps // 10)}", f"eval_every={steps}",
        f"eval_batches={max(1, f.heldout_scenes // f.batch)}", f"ckpt_every={steps}",
        "async_checkpoint=False", *extra])
    return c


def _heldout(workdir, name) -> dict:
    rows = read_jsonl(Path(workdir) / "metrics.jsonl", split="eval")
    last = rows[-1]
    return {"loss": float(last[f"loss/{name}"]), "accuracy": float(last[f"acc/{name}"]),
            "step": int(last["step"])}


def _timed_train(cfg, workdir):
    t0 = time.perf_counter()
    trainer.train(cfg, str(workdir))
    return time.perf_counter() - t0


def finetune_vs_scratch(f, root: Path, log=print) -> dict:
    """Steps 1 and 2 of the module docstring; returns the figures."""
    train, held = root / "shards_train", root / "shards_heldout"
    mods = PRETRAIN_MODALITIES + (NEW,)
    if not (train / "manifest.json").exists():
        make_scene_shards(train, num_scenes=f.scenes, modalities=mods, shard_size=max(8, f.scenes // 4))
    if not (held / "manifest.json").exists():
        make_scene_shards(held, num_scenes=f.heldout_scenes, seed=HELDOUT_SEED, modalities=mods,
                          shard_size=max(8, f.heldout_scenes // 2))
    log(f"[finetune] pretraining {f.pretrain_steps} steps on {list(PRETRAIN_MODALITIES)}")
    pre_s = _timed_train(_train_config(f, train, held, root / "pretrain", PRETRAIN_MODALITIES,
                                       f.pretrain_steps), root / "pretrain")
    export = root / "pretrain" / "export"
    task = ["masking.mixture=all2all", f"masking.target_only={json.dumps([NEW])}"]
    out = {"pretrain_s": pre_s}
    for name, extra in (("pretrained", [f"init.checkpoint={export}"]), ("scratch", [])):
        log(f"[finetune] rgb -> {NEW}: {f.finetune_steps} steps, {name}")
        wd = root / f"normals_{name}"
        secs = _timed_train(_train_config(f, train, held, wd, ("rgb@64", NEW), f.finetune_steps,
                                          task + extra), wd)
        out[name] = {**_heldout(wd, NEW), "train_s": secs}
    out["export"] = str(export)
    return out


def _probe_data(num: int, seed: int):
    scenes = list(generate_scenes(seed, 0, num, 64, progress=False))
    rgb = np.stack([s["rgb"] for s in scenes])
    labels = PatchQuantizer("semseg").encode(np.stack([s["semseg"] for s in scenes]))
    return {"rgb@64": rgb}, labels.reshape(num, -1)


def backbone_vs_scratch(f, export: Path, log=print) -> dict:
    """Step 3: per-patch semantic class from rgb, on the pretrained vs a random encoder."""
    train_in, train_y = _probe_data(f.probe_scenes, 0)
    held_in, held_y = _probe_data(f.heldout_scenes, HELDOUT_SEED)
    pretrained_cfg = backbone.load(export).spec
    out = {}
    for init in ("pretrained", "random"):
        for mode in ("probe", "finetune"):
            model = (backbone.load(export) if init == "pretrained"
                     else build_model(pretrained_cfg, seed=1))  # same architecture, random weights
            head = backbone.TaskHead(model, 8, per_token=True, rngs=nnx.Rngs(0))
            t0 = time.perf_counter()
            backbone.fit(head, train_in, train_y, steps=f.probe_steps, batch_size=f.batch, lr=f.lr,
                         train_encoder=mode == "finetune")
            out[f"{mode}_{init}"] = {**backbone.evaluate(head, held_in, held_y),
                                     "train_s": time.perf_counter() - t0}
            log(f"[finetune] semseg {mode} on a {init} encoder: {out[f'{mode}_{init}']}")
    return out


def run(f, workdir: str | Path | None = None, log=print) -> dict:
    root = Path(workdir or tempfile.mkdtemp(prefix="fourm_bench_finetune_"))
    root.mkdir(parents=True, exist_ok=True)
    ft = finetune_vs_scratch(f, root, log)
    bb = backbone_vs_scratch(f, Path(ft["export"]), log)
    return {"config": f.to_dict(), "finetune": ft, "backbone": bb}


def format_figures(fig: dict) -> str:
    ft, bb = fig["finetune"], fig["backbone"]
    lines = [f"new modality {NEW} (rgb -> normals), held-out, after {fig['config']['finetune_steps']} steps:",
             *(f"  {k:10s} loss {ft[k]['loss']:.4f}  token accuracy {ft[k]['accuracy']:.4f}"
               for k in ("pretrained", "scratch")),
             f"per-patch semantic class from rgb (8 classes), held-out, {fig['config']['probe_steps']} steps:",
             *(f"  {k:20s} loss {v['loss']:.4f}  accuracy {v['accuracy']:.4f}" for k, v in bb.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import logging

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, minutes)")
    p.add_argument("--workdir", default=None, help="keep shards, runs and exports here")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/bench.py's finetune section, e.g. --set pretrain_steps=800")
    args = p.parse_args(argv)
    for noisy in ("absl", "orbax", "jax", "tensorboardX"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    f = default_config(args.quick)
    for item in args.set:
        key, _, value = item.partition("=")
        f[key] = type(f[key])(value)
    fig = run(f, args.workdir)
    print(format_figures(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
