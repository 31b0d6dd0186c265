"""Single-task specialists: the anchor the any-to-any model is measured against (issue 16).

    python -m fourm.bench.specialists --data runs/quickstart --minutes 12
    python -m fourm.bench.specialists --data runs/quickstart --minutes 1 --tasks depth,caption

For each RGB -> X task a small model of its own, trained on the same training scenes as the
quickstart (read from `--data`'s config.json: seed, train_scenes, heldout_start, heldout_scenes)
for `--minutes` of wall time each, then scored on the same held-out scenes with the same metrics
(fourm.quality.metrics):
* depth / normals / segmentation: a conv U-Net on pixels (3 levels, skip connections), trained
  with L1 on log depth / (1 - cosine) on normals / cross-entropy on classes;
* caption: a conv encoder with three heads (object count, which colours, which shapes), the facts
  the caption metric scores; a caption is not generated, the facts are scored directly.
caption -> RGB has no specialist (optional in the issue); the checker judges the model alone.
Writes `<data>/specialists.json` ({"minutes", "tasks": {task: {metric: value}}}), which the
quickstart's quality.json and report pick up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fourm.data import scenes as scenes_lib
from fourm.io import atomic_write_json
from fourm.quality import metrics as M

TASKS = {"depth": "rgb->depth", "normals": "rgb->normals", "semseg": "rgb->semseg", "caption": "rgb->caption"}
OUT_CHANNELS = {"depth": 1, "normals": 3, "semseg": scenes_lib.NUM_CLASSES}
MAX_COUNT = 7  # object counts 0..6 (SceneConfig.max_objects = 6)


class ConvBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.c2(jax.nn.gelu(self.c1(x))))


class UNet(nnx.Module):
    """Pixels [B, H, W, 3] in [0, 1] -> [B, H, W, out]; H, W divisible by 4."""

    def __init__(self, out: int, width: int = 32, rngs: nnx.Rngs = nnx.Rngs(0)):
        w = width
        self.e1, self.e2, self.e3 = ConvBlock(3, w, rngs), ConvBlock(w, 2 * w, rngs), ConvBlock(2 * w, 4 * w, rngs)
        self.d2, self.d1 = ConvBlock(6 * w, 2 * w, rngs), ConvBlock(3 * w, w, rngs)
        self.head = nnx.Conv(w, out, (1, 1), rngs=rngs)

    def __call__(self, x):
        h1 = self.e1(x)
        h2 = self.e2(nnx.max_pool(h1, (2, 2), (2, 2)))
        h3 = self.e3(nnx.max_pool(h2, (2, 2), (2, 2)))
        up = lambda h: jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # noqa: E731
        d2 = self.d2(jnp.concatenate([up(h3), h2], -1))
        return self.head(self.d1(jnp.concatenate([up(d2), h1], -1)))


class FactsNet(nnx.Module):
    """Pixels -> (count logits [B, 7], colour logits [B, 8], shape logits [B, 4])."""

    def __init__(self, width: int = 32, rngs: nnx.Rngs = nnx.Rngs(0)):
        w = width
        self.b1, self.b2, self.b3 = ConvBlock(3, w, rngs), ConvBlock(w, 2 * w, rngs), ConvBlock(2 * w, 4 * w, rngs)
        self.hidden = nnx.Linear(4 * w, 4 * w, rngs=rngs)
        self.out = nnx.Linear(4 * w, MAX_COUNT + len(scenes_lib.COLOURS) + len(scenes_lib.SHAPES), rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(self.b1(x), (2, 2), (2, 2))
        h = nnx.max_pool(self.b2(h), (2, 2), (2, 2))
        h = self.b3(h)
        h = jnp.concatenate([h.mean((1, 2))[..., : h.shape[-1] // 2], h.max((1, 2))[..., h.shape[-1] // 2:]], -1)
        o = self.out(jax.nn.gelu(self.hidden(h)))
        nc = len(scenes_lib.COLOURS)
        return o[:, :MAX_COUNT], o[:, MAX_COUNT:MAX_COUNT + nc], o[:, MAX_COUNT + nc:]


# ---------------------------------------------------------------------------------------------
# Targets and losses (pure functions of arrays)
# ---------------------------------------------------------------------------------------------
def targets(task: str, samples: list[dict]) -> np.ndarray:
    if task == "depth":
        return np.stack([np.log(s["depth"]) for s in samples])[..., None].astype(np.float32)
    if task == "normals":
        return np.stack([s["normals"] for s in samples]).astype(np.float32)
    if task == "semseg":
        return np.stack([s["semseg"] for s in samples]).astype(np.int32)
    facts = np.zeros((len(samples), 1 + len(scenes_lib.COLOURS) + len(scenes_lib.SHAPES)), np.float32)
    for i, s in enumerate(samples):
        facts[i, 0] = len(s["boxes"])
        for b in s["boxes"]:
            facts[i, 1 + scenes_lib.COLOURS.index(b["colour"])] = 1
            facts[i, 1 + len(scenes_lib.COLOURS) + scenes_lib.SHAPES.index(b["class"])] = 1
    return facts


def loss_fn(task: str, out, y):
    if task == "depth":
        return jnp.abs(out - y).mean()
    if task == "normals":
        n = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-6)
        return (1 - (n * y).sum(-1)).mean()
    if task == "semseg":
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    count, colours, shapes = out
    nc = len(scenes_lib.COLOURS)
    return (optax.softmax_cross_entropy_with_integer_labels(count, y[:, 0].astype(jnp.int32)).mean()
            + optax.sigmoid_binary_cross_entropy(colours, y[:, 1:1 + nc]).mean()
            + optax.sigmoid_binary_cross_entropy(shapes, y[:, 1 + nc:]).mean())


def make_model(task: str, width: int, seed: int):
    rngs = nnx.Rngs(seed)
    return FactsNet(width, rngs=rngs) if task == "caption" else UNet(OUT_CHANNELS[task], width, rngs=rngs)


def train_specialist(task: str, rgb: np.ndarray, y: np.ndarray, *, minutes: float, batch: int = 32,
                     lr: float = 2e-3, width: int = 32, seed: int = 0, max_steps: int | None = None,
                     log=print):
    """Train for `minutes` of wall time (compile included: the budget is what a user waits) or
    `max_steps`, whichever ends first. Returns (model, steps)."""
    model = make_model(task, width, seed)
    graphdef, params = nnx.split(model)
    opt = optax.adamw(optax.warmup_constant_schedule(0.0, lr, 50), weight_decay=1e-4)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, yb):
        def f(p):
            return loss_fn(task, nnx.merge(graphdef, p)(x), yb)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    t0, steps, n = time.perf_counter(), 0, len(rgb)
    while time.perf_counter() - t0 < minutes * 60 and (max_steps is None or steps < max_steps):
        idx = rng.integers(0, n, min(batch, n))
        params, opt_state, loss = step(params, opt_state, jnp.asarray(rgb[idx], jnp.float32) / 255.0,
                                       jnp.asarray(y[idx]))
        steps += 1
        if steps % 200 == 0:
            log(f"[specialists] {task}: step {steps}, loss {float(loss):.4f}, "
                f"{(time.perf_counter() - t0) / 60:.1f} min")
    return nnx.merge(graphdef, params), steps


def predict(task: str, model, rgb: np.ndarray, batch: int = 64):
    fwd = nnx.jit(lambda m, x: m(x))
    outs = [jax.tree.map(np.asarray, fwd(model, jnp.asarray(rgb[i:i + batch], jnp.float32) / 255.0))
            for i in range(0, len(rgb), batch)]
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def score(task: str, out, held: list[dict]) -> dict[str, float]:
    """The same metrics as fourm.generate.evaluate, on the specialist's outputs."""
    if task == "depth":
        true = np.stack([s["depth"] for s in held])
        pred = np.exp(out[..., 0])
        return {"abs_rel": float(M.abs_rel(pred, true).mean()),
                "rmse": float(np.sqrt(M.squared_error(pred, true).mean()))}
    if task == "normals":
        return {"mean_angle_deg": float(M.mean_angle_deg(out, np.stack([s["normals"] for s in held])).mean())}
    if task == "semseg":
        return M.semseg_scores(out.argmax(-1), np.stack([s["semseg"] for s in held]))
    count, colours, shapes = out
    facts = [M.CaptionFacts(int(c.argmax()), frozenset(np.array(scenes_lib.COLOURS)[col > 0]),
                            frozenset(np.array(scenes_lib.SHAPES)[sh > 0]))
             for c, col, sh in zip(count, colours, shapes)]
    return M.caption_scores(facts, held)


def run(data: Path, minutes: float, tasks: list[str], *, train_scenes: int | None = None,
        eval_scenes: int | None = None, workers: int = 1, max_steps: int | None = None,
        width: int = 32, out: Path | None = None, log=print) -> dict:
    cfg_path = data / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"--data: {data} has no config.json (expected a fourm-quickstart workdir)")
    cfg = json.loads(cfg_path.read_text())
    missing = [k for k in ("seed", "resolution", "train_scenes", "heldout_start", "heldout_scenes") if k not in cfg]
    if missing:
        raise ValueError(f"--data: {cfg_path} lacks {missing} (expected a fourm-quickstart config.json)")
    seed, res = int(cfg["seed"]), int(cfg["resolution"])
    n_train = int(train_scenes or cfg["train_scenes"])
    n_eval = int(eval_scenes or cfg["heldout_scenes"])
    log(f"[specialists] scenes: train [0, {n_train}), held-out [{cfg['heldout_start']}, +{n_eval}) at {res} px")
    train = list(scenes_lib.generate_scenes(seed, 0, n_train, resolution=res, workers=workers))
    held = list(scenes_lib.generate_scenes(seed, int(cfg["heldout_start"]), n_eval, resolution=res,
                                           workers=workers))
    rgb = np.stack([s["rgb"] for s in train])
    result = {"minutes": minutes, "train_scenes": n_train, "eval_scenes": n_eval, "tasks": {}}
    for task in tasks:
        model, steps = train_specialist(task, rgb, targets(task, train), minutes=minutes, seed=seed,
                                        max_steps=max_steps, width=width, log=log)
        figures = score(task, predict(task, model, np.stack([s["rgb"] for s in held])), held)
        result["tasks"][TASKS[task]] = {**figures, "steps": steps}
        log(f"[specialists] {TASKS[task]}: {figures} after {steps} steps")
    atomic_write_json(out or data / "specialists.json", result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fourm.bench.specialists", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a fourm-quickstart workdir (its config.json names the scenes)")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training minutes per specialist")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--train_scenes", type=int, help="override the workdir's train_scenes")
    p.add_argument("--eval_scenes", type=int, help="override the workdir's heldout_scenes")
    p.add_argument("--max_steps", type=int, help="stop earlier than --minutes after this many steps")
    p.add_argument("--width", type=int, default=32, help="channels of the first level")
    p.add_argument("--workers", type=int, default=1, help="scene-generation processes")
    p.add_argument("--out", help="output JSON (default: DATA/specialists.json)")
    a = p.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks: unknown {bad}, expected a subset of {list(TASKS)}")
    if a.minutes <= 0:
        p.error(f"--minutes: got {a.minutes}, expected > 0")
    try:
        run(Path(a.data), a.minutes, tasks, train_scenes=a.train_scenes, eval_scenes=a.eval_scenes,
            workers=a.workers, max_steps=a.max_steps, width=a.width, out=Path(a.out) if a.out else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
