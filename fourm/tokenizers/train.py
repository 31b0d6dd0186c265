"""Train an image-like tokenizer (VQ-VAE) from a `tokenizers/<modality>.py` config.

One linear story: workdir -> mesh -> data -> model & optimizer -> train step -> checkpoints ->
loop (metrics, reconstruction PNGs) -> held-out evaluation. Data-parallel over every device: the
batch is sharded on the mesh's `data` axis, weights are replicated, and the jitted step works on
global arrays (XLA inserts the gradient and codebook-statistics all-reduces).

Determinism: the batch of step `s` is a pure function of (data.seed, seed, s), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from fourm.config import to_json
from fourm.io import atomic_write
from fourm.tokenizers import data as tok_data
from fourm.tokenizers.image import (FORMAT_VERSION, WEIGHTS, ImageTokenizer, build_model,
                                    check_same_tokenizer, config_hash)
from fourm.tokenizers.quantizers import VectorQuantizer, perplexity
from fourm.tokenizers.recipes import tokenizer_section
from fourm.tokenizers.runs import checkpoint_manager


# ---------------------------------------------------------------------------------------------
# Workdir: the resolved config, and a guard against resuming with a contradicting config
# ---------------------------------------------------------------------------------------------


def prepare_workdir(cfg, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    tok_file = workdir / "tokenizer.json"
    if tok_file.exists():
        stored = json.loads(tok_file.read_text())
        check_same_tokenizer(stored["tokenizer_config"], cfg, f"the run in {workdir}")
    elif jax.process_index() == 0:
        atomic_write(tok_file, json.dumps({
            "format_version": FORMAT_VERSION, "config_hash": config_hash(cfg),
            "tokenizer_config": tokenizer_section(cfg)}, indent=2, sort_keys=True))
    if jax.process_index() == 0:
        atomic_write(workdir / "config.json", to_json(cfg))


# ---------------------------------------------------------------------------------------------
# Mesh and optimizer
# ---------------------------------------------------------------------------------------------
def data_parallel_mesh(cfg) -> jax.sharding.Mesh:
    """A 1-D ("data",) mesh over the first `train.devices` devices (tokenizers train data-parallel;
    the model's (data, fsdp, tensor) mesh is `fourm.train.mesh.make_mesh`)."""
    m = cfg.get("mesh", {})
    if m and (m.get("fsdp", 1) != 1 or m.get("tensor", 1) != 1):
        raise ValueError("tokenizer training is data-parallel only: set mesh.fsdp=1 mesh.tensor=1")
    n = int(cfg.train.get("devices", 0)) or jax.device_count()
    if not 0 < n <= jax.device_count() or (n != jax.device_count() and jax.process_count() > 1):
        raise ValueError(f"train.devices={n}: use 0 (every device) or 1..{jax.device_count()} "
                         f"(a subset only in a single-process run)")
    if cfg.train.batch_size % n:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                         f"{n} devices of the data-parallel mesh")
    # Auto axes: XLA propagates the batch sharding through reshapes (space-to-depth etc.);
    # explicit sharding-in-types would demand annotations on every reshape.
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
                                               end_value=t.lr * t.end_lr_fraction)
    # Weight decay on conv kernels only (not on biases or norm scales).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(sched, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                                 mask=decay_mask))
    return tx, sched


# ---------------------------------------------------------------------------------------------
# The train step (pure: state pytree in, state pytree out)
# ---------------------------------------------------------------------------------------------
def make_train_step(cfg, graphdef, codec, tx, sched):
    def train_step(state, batch, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["rest"])
            xin, _ = codec.to_input(batch)
            y, q = model(xin)
            rec, metrics = codec.loss(y, batch)
            return rec + q.loss, (metrics, q.z, q.ids, q.loss)

        (loss, (metrics, z, ids, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rest = state["rest"]
        model = nnx.merge(graphdef, params, rest)
        if isinstance(model.quantizer, VectorQuantizer):
            metrics.update(model.quantizer.update_codebook(z, ids, key))
            rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        counts = jnp.bincount(ids.reshape(-1), length=model.quantizer.codebook_size)
        metrics.update({"loss": loss, "quantizer_loss": aux, "grad_norm": optax.tree.norm(grads),
                        "lr": sched(state["step"]), "batch_usage": jnp.mean(counts > 0),
                        "batch_perplexity": perplexity(counts.astype(jnp.float32))})
        return {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}, metrics

    return train_step


def batch_indices(cfg, step: int, n_items: int) -> np.ndarray:
    """Global batch of step `step`: a pure function of the seeds and the step (resume-exact)."""
    rng = np.random.default_rng([int(cfg.seed), int(cfg.data.seed), int(step)])
    return rng.integers(0, n_items, size=int(cfg.train.batch_size))


def put_batch(local: np.ndarray, sharding) -> jax.Array:
    """This process's rows of the global batch -> one global array sharded over `data`."""
    n = jax.process_count()
    rows = local.shape[0] // n
    mine = local[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, mine, local.shape)


# ---------------------------------------------------------------------------------------------
# Reconstruction pictures
# ---------------------------------------------------------------------------------------------
def save_reconstructions(tok: ImageTokenizer, x: np.ndarray, path: Path) -> None:
    """PNG with one row per example: input | reconstruction."""
    from fourm.tokenizers.visual import save_pairs

    save_pairs(tok.codec, x, tok.reconstruct(x), path)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(cfg, *, workdir: str | None = None, steps: int | None = None,
          evaluate_at_end: bool = True) -> dict:
    """Train (or resume) the tokenizer of `cfg` in `workdir`; returns the last metrics."""
    t = cfg.train
    if steps is not None:
        t.steps = int(steps)
    workdir = Path(workdir or cfg.workdir)
    prepare_workdir(cfg, workdir)
    is_main = jax.process_index() == 0

    # --- mesh -------------------------------------------------------------------------------
    mesh = data_parallel_mesh(cfg)
    data_sh = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())

    # --- data -------------------------------------------------------------------------------
    train_x = tok_data.load_split(cfg, "train")
    preview = tok_data.load_split(cfg, "eval")[: int(t.num_images)]

    # --- model and optimizer ----------------------------------------------------------------
    codec, model = build_model(cfg, seed=int(cfg.seed))
    codec.check(train_x[:1], cfg.resolution)  # the training data obeys the native contract
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, sched = make_optimizer(t)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state, repl)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    step_fn = jax.jit(make_train_step(cfg, graphdef, codec, tx, sched),
                      in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl),
                      donate_argnums=0)

    # --- checkpoints (resume if any) --------------------------------------------------------
    mngr = checkpoint_manager(workdir, t)
    start = 0
    if mngr.latest_step() is not None:
        start = int(mngr.latest_step())
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), state)
        restored = mngr.restore(start, args=ocp.args.Composite(
            model=ocp.args.StandardRestore({"params": abstract["params"], "rest": abstract["rest"]}),
            opt=ocp.args.StandardRestore(abstract["opt"]), meta=ocp.args.JsonRestore()))
        state = {**restored["model"], "opt": restored["opt"],
                 "step": jax.device_put(jnp.asarray(start, jnp.int32), repl)}

    def save(step: int, force: bool = False):
        meta = {"step": step, "config_hash": config_hash(cfg), "format_version": FORMAT_VERSION}
        mngr.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state["params"], "rest": state["rest"]}),
            opt=ocp.args.StandardSave(state["opt"]), meta=ocp.args.JsonSave(meta)), force=force)

    tok = None

    def tokenizer_now(step: int) -> ImageTokenizer:
        nonlocal tok
        weights = nnx.split(nnx.merge(graphdef, state["params"], state["rest"]), WEIGHTS, ...)[1]
        if tok is None:
            tok = ImageTokenizer(cfg, weights, step=step, source=str(workdir))
        else:  # same jitted encode/decode, new weights: no recompilation
            tok = tok.with_weights(weights, step=step)
        return tok

    # --- metrics sinks ----------------------------------------------------------------------
    metrics_path = workdir / "metrics.jsonl"
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"))
        _truncate_metrics(metrics_path, start)
        (workdir / "images").mkdir(exist_ok=True)

    # --- loop -------------------------------------------------------------------------------
    last = {}
    t0 = time.time()
    bar = tqdm(range(start, int(t.steps)), initial=start, total=int(t.steps), disable=not is_main,
               desc=f"train {cfg.name}@{cfg.resolution}", dynamic_ncols=True)
    base_key = jax.random.key(int(cfg.seed))
    for step in bar:
        batch = put_batch(train_x[batch_indices(cfg, step, len(train_x))], data_sh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
        done = step + 1
        if done % int(t.log_every) == 0 or done == int(t.steps):
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            last.update(step=done, elapsed_s=round(time.time() - t0, 2))
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "batch_usage") if k in last})
            if is_main:
                for k, v in last.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, done)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
        if is_main and (done % int(t.image_every) == 0 or done == int(t.steps)):
            save_reconstructions(tokenizer_now(done), preview, workdir / "images" / f"step_{done:06d}.png")
        if done % int(t.ckpt_every) == 0 or done == int(t.steps):
            save(done, force=done == int(t.steps))
    bar.close()
    mngr.wait_until_finished()
    mngr.close()

    result = {"train": last, "params": int(n_params), "workdir": str(workdir)}
    if evaluate_at_end and is_main:
        from fourm.tokenizers.evaluate import evaluate, write_report

        final = int(t.steps)
        ev = evaluate(tokenizer_now(final), tok_data.load_split(cfg, "eval"))
        write_report(ev, workdir / f"eval_step{final:06d}.json")
        for k, v in ev.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(f"eval/{k}", v, final)
        result["eval"] = ev
    if writer is not None:
        writer.close()
    return result


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint we restart from."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))
