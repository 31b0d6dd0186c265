"""Training benchmark: `python -m fourm.bench.train [--config pretrain:tiny] [--steps 10]`.

Builds exactly the trainer's pieces (mesh, grain pipeline, model, shardings, jitted donated
update step, orbax checkpointer) on scene shards made with `fourm.bench.shards` (or
`--config.data.dir`), then prints:

* step time and tokens/s of the update step (input tokens + target tokens per example);
* FLOPs per step as XLA counts them for the compiled step, and the achieved FLOP/s;
* input pipeline throughput alone (examples/s of grain + masking), next to the examples/s the
  step consumes, so it is visible whether the input is the bottleneck;
* how long an asynchronous checkpoint save blocks the loop vs. how long the whole save takes.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from absl import app, flags

from fourm.config import define_config_flag

_CONFIG = define_config_flag("pretrain:tiny")
_STEPS = flags.DEFINE_integer("steps", 10, "timed update steps (after one warm-up step)")
_BATCHES = flags.DEFINE_integer("input_batches", 20, "batches for the input-pipeline measurement")
_SCENES = flags.DEFINE_integer("scenes", 256, "scenes in the generated shards (without data.dir)")
_JSON = flags.DEFINE_string("json", None, "also write the figures here")

SCENE_MODALITIES = ("rgb@64", "tok_rgb@64", "tok_depth@64", "tok_normal@64", "tok_semseg@64",
                    "caption", "det")


def _main(argv):
    del argv
    import logging

    for noisy in ("absl", "orbax", "jax", "tensorboardX"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax
    import numpy as np

    from fourm.bench.shards import make_scene_shards
    from fourm.data.shards import open_shards
    from fourm.masking import GrainMasking
    from fourm.train import aot, checkpointing, input_pipeline, trainer
    from fourm.train.mesh import describe
    from fourm.train.plan import build_plan

    config = _CONFIG.value
    tmp = Path(tempfile.mkdtemp(prefix="fourm_bench_"))
    if not config.data.dir:
        t0 = time.perf_counter()
        config.data.dir = str(tmp / "shards")
        mods = [m for m in config.model.modalities if m in SCENE_MODALITIES]
        make_scene_shards(config.data.dir, num_scenes=_SCENES.value, modalities=mods)
        print(f"made {_SCENES.value} scene shards in {time.perf_counter() - t0:.1f} s "
              f"(patch-quantizer tokenizers, fourm.bench.shards)")

    source, manifest = open_shards(config.data.dir)
    plan = build_plan(config, manifest, data_dir=config.data.dir)  # the trainer's own step
    config, mesh, masking = plan.resolved_config(), plan.mesh, plan.masking
    tokens = config.batch_size * plan.tokens_per_example
    batch_sh = plan.batch_shardings
    row_offset, _ = input_pipeline.process_rows(batch_sh["enc_ids"], config.batch_size)
    ds = input_pipeline.build_dataset(
        source, transform=GrainMasking(masking), decode=trainer.SelectModalities(config.model.modalities),
        seed=config.seed, global_batch=config.batch_size, row_offset=row_offset)

    # ---- input pipeline alone
    it = input_pipeline.to_iterator(ds, num_workers=config.data.num_workers,
                                    num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    next(it)
    t0 = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(it)
    input_s = (time.perf_counter() - t0) / _BATCHES.value

    # ---- the update step
    batch = input_pipeline.global_batch_array(next(it), batch_sh, row_offset)
    t0 = time.perf_counter()
    train_step, _ = plan.compile_train_step()
    compile_s = time.perf_counter() - t0
    cost = train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) * mesh.devices.size  # per-device program
    flops = aot.model_flops_per_step(config.model, plan.modalities, masking.input_budget,
                                     masking.target_budget, config.batch_size)
    state = plan.init_state()
    with jax.set_mesh(mesh):
        state, m = train_step(state, batch)  # warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(_STEPS.value):
            batch = input_pipeline.global_batch_array(next(it), batch_sh, row_offset)
            t0 = time.perf_counter()
            state, m = train_step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))

    # ---- checkpoint: blocking part vs whole save
    ck = checkpointing.Checkpointer(tmp / "ckpt", async_save=True)
    t0 = time.perf_counter()
    ck.save(1, state, it, {})
    blocked_s = time.perf_counter() - t0
    ck.wait()
    save_s = time.perf_counter() - t0
    ck.close()

    n_params = plan.num_params
    figures = dict(
        config=config.variant, devices=mesh.devices.size, mesh=describe(mesh), params=n_params,
        batch=config.batch_size, tokens_per_step=tokens, compile_s=round(compile_s, 2),
        step_s=round(step_s, 4), tokens_per_s=round(tokens / step_s, 1),
        model_flops_per_step=flops, xla_flops_per_step=xla_flops, achieved_flops_per_s=flops / step_s,
        input_batch_s=round(input_s, 4), input_examples_per_s=round(config.batch_size / input_s, 1),
        step_examples_per_s=round(config.batch_size / step_s, 1),
        input_share_of_step=round(input_s / step_s, 3),
        ckpt_blocking_s=round(blocked_s, 3), ckpt_total_s=round(save_s, 3))
    print(f"config {config.variant}: {n_params / 1e6:.2f}M params, batch {config.batch_size}, "
          f"{tokens} tokens/step, mesh {describe(mesh)}, {jax.devices()[0].platform}")
    print(f"  update step      {step_s * 1e3:8.1f} ms  ({tokens / step_s:,.0f} tokens/s; compile {compile_s:.1f} s)")
    print(f"  FLOPs per step   {flops:.3e} model (analytic fwd+bwd) -> {flops / step_s / 1e9:.2f} GFLOP/s "
          f"achieved; XLA counts {xla_flops:.3e} (scanned layers once)")
    print(f"  input pipeline   {input_s * 1e3:8.1f} ms per batch ({config.batch_size / input_s:,.0f} examples/s, "
          f"{config.data.num_workers} workers) = {100 * input_s / step_s:.0f}% of a step: "
          f"{'NOT the bottleneck' if input_s < step_s else 'THE BOTTLENECK'}")
    print(f"  checkpoint save  blocks the loop {blocked_s * 1e3:.0f} ms, completes in {save_s * 1e3:.0f} ms")
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(figures, indent=2))


def main():
    app.run(_main)


if __name__ == "__main__":
    main()
