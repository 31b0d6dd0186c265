"""The benchmark suite behind `fourm-bench`: groups of measurements, one table, JSON for comparison.

    from fourm.bench import suite
    results, failed = suite.run_suite(load_config("bench:quick"), only=["model", "scenes"])

Groups (`--only` names): model (forward, forward+backward), train (train step), generate (RGB ->
depth MaskGIT -> caption), tokenizer (VQ encode/decode, text), ml4m_tokenizer (4M's ViT VQ-VAE
encode, ported to JAX), scenes (generator), pretokenize
(scenes -> tokens -> ArrayRecord shards), masking (4M masking transform), pipeline (shards ->
grain -> masked batches, as the trainer reads them), trainer (fourm.bench.train: the real trainer's
step, input and checkpoint on scene shards), integrity (fourm.bench.integrity: checkpoint
durability window, shard sha256 cost), finetune (fourm.bench.finetune: fine-tuning and the
encoder as a backbone vs training from scratch, held-out quality), divae (4M's DiVAE decode,
fourm.bench.divae; not in the default list: 1000 DDPM steps at 224 px take long on a CPU). Each
group is a function `config -> list of
Result` (fourm.bench.common). Scenes, masking, tokenizers and shards call the per-area benchmark
functions (fourm.bench.scenes.cpu_rate / measure, fourm.masking.__main__.benchmark,
fourm.bench.tokenizer, fourm.bench.shards); model, train step, generation and the input pipeline are
measured here through the public APIs (fourm.model, fourm.train.step, fourm.generate.chain,
fourm.train.input_pipeline), since fourm.bench.model / generate print rather than return figures
(and define absl flags at import). With `config.isolate` each group runs in a fresh
Python process (`python -m fourm.bench.suite CONFIG.json GROUP OUT.json`) so its peak memory and
compile caches are its own.

Model FLOPs: XLA's cost analysis counts a while-loop body once, so the scanned layers and the
chunked output head would be undercounted. The count lowers an *unrolled* twin of the model (same
shapes, abstract weights, no remat: model FLOPs, not hardware FLOPs) for encoder + decoder, and adds
the output heads exactly: 2 T_m D V_m per target modality forward, 3x that forward+backward.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from fourm.io import atomic_write
from fourm.bench import reference
from fourm.bench.common import (Result, children_peak_rss_bytes, device_peak_bytes, peak_rss_bytes,
                                reset_peak_rss, time_calls)

# PyTorch ml-4m recorded once on another, slower 2-core VM, fp32, batch 8, 128 + 128 tokens, the 4
# reference modalities (MISSION.md): seconds per call. Shown only marked "recorded" (a ratio across
# machines); --reference_python/--reference_src measure ml-4m in the same run (fourm.bench.reference).
REFERENCE_S = {"model.tiny.fwd": 0.48, "model.tiny.fwd_bwd": 1.52, "model.base.fwd": 2.9,
               "model.base.fwd_bwd": 9.1, "generate.tiny.maskgit": 1.0, "generate.base.maskgit": 5.9}
REFERENCE_MODALITIES = ("rgb@224", "tok_rgb@224", "tok_depth@224", "caption")


def compute_dtype(c) -> str:
    return c.dtype or ("bfloat16" if c.device == "gpu" else "float32")


def _at_reference_shapes(c) -> bool:
    m = c.model
    return (c.device == "cpu" and compute_dtype(c) == "float32" and m.batch == 8 and m.input_tokens == 128
            and m.target_tokens == 128 and tuple(m.modalities) == REFERENCE_MODALITIES and m.family == "ml4m"
            and not m.depth)


def _reference(c, name: str) -> float | None:
    return REFERENCE_S.get(name) if _at_reference_shapes(c) else None


def _finish(r: Result) -> Result:
    """Attach the memory figures measured since the last reset_peak_rss()."""
    r.peak_rss = peak_rss_bytes() if r.peak_rss is None else r.peak_rss
    r.device_peak = device_peak_bytes() if r.device_peak is None else r.device_peak
    return r


# ============================================================================================ model
def model_config(c, size: str):
    from fourm.model import model_config as base_config

    cfg = base_config(size, "swiglu")
    cfg.family, cfg.modalities = c.model.family, list(c.model.modalities)
    cfg.update(dtype=compute_dtype(c), head_impl=c.model.head_impl, scan_layers=c.model.scan_layers,
               remat=c.model.remat, attention_impl=c.model.get("attention_impl", ""))
    if c.model.depth:
        cfg.encoder_depth = cfg.decoder_depth = int(c.model.depth)
    return cfg


def model_batch(c, spec) -> dict:
    import jax.numpy as jnp

    from fourm.model.synthetic import synthetic_batch

    b = synthetic_batch(spec, c.model.batch, c.model.input_tokens, c.model.target_tokens)
    return {k: jnp.asarray(v) for k, v in b.items()}


def model_flops(cfg, batch) -> dict:
    """Forward and forward+backward FLOPs: unrolled twin through XLA + exact head count."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fourm.bench.common import xla_flops
    from fourm.model import build_model

    twin = cfg.copy_and_resolve_references()
    twin.update(scan_layers=False, remat="none")
    abstract = nnx.eval_shape(lambda: build_model(twin, seed=0))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    spec = abstract.spec

    def trunk(p, r, b):
        m = nnx.merge(graphdef, p, r)
        return m.decode(m.encode(b), b)

    def trunk_sum(p, r, b):
        return jnp.sum(trunk(p, r, b).astype(jnp.float32))

    trunk_fwd = xla_flops(trunk, params, rest, batch)
    trunk_fwd_bwd = xla_flops(jax.grad(trunk_sum), params, rest, batch)
    dec_mod, dec_valid = np.asarray(batch["dec_mod"]), np.asarray(batch["dec_valid"])
    head = sum(2.0 * np.sum((dec_mod == i) & dec_valid) * spec.dim * spec.modalities[i].vocab_size
               for i in spec.targets)
    return dict(fwd=trunk_fwd and trunk_fwd + head, fwd_bwd=trunk_fwd_bwd and trunk_fwd_bwd + 3 * head,
                trunk_fwd=trunk_fwd, head_fwd=head)


def bench_model(c) -> list[Result]:
    import jax
    from flax import nnx

    from fourm.model import build_model, loss_fn

    out = []
    with reference.open_worker(c) as ref:
        for size in c.model.sizes:
            cfg = model_config(c, size)
            model = build_model(cfg, seed=0)
            batch = model_batch(c, model.spec)
            _build_reference(ref, size, cfg, model.spec, batch)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(p, b):
                return loss_fn(nnx.merge(graphdef, p, rest), b)[0]

            flops = model_flops(cfg, batch)
            tokens = c.model.batch * (c.model.input_tokens + c.model.target_tokens)
            n_params = sum(x.size for x in jax.tree.leaves(params))
            for kind, fn in (("fwd", jax.jit(loss)), ("fwd_bwd", jax.jit(jax.value_and_grad(loss)))):
                reset_peak_rss()
                t = time_calls(lambda: fn(params, batch), c.iters)
                name = f"model.{size}.{kind}"
                r = Result(name, t.median_s, tokens / t.median_s, "tokens/s", flops=flops[kind],
                           reference_s=_reference(c, name), first_s=t.first_s, cpu_s=t.cpu_s,
                           extra=dict(params=n_params, dtype=cfg.dtype, batch=c.model.batch, tokens=tokens,
                                      trunk_fwd_flops=flops["trunk_fwd"], head_fwd_flops=flops["head_fwd"]))
                out.append(_finish(reference.compare(r, lambda: fn(params, batch), ref, size, kind, c)))
            del model, params, rest, batch
    return out


def _build_reference(ref, key: str, cfg, spec, batch=None, train=None) -> None:
    """ml-4m's model at fourm's shapes in the reference worker (with fourm's token counts)."""
    if ref is None:
        return
    answer = ref.build(key, model=reference.model_spec(cfg), train=train,
                       batch=None if batch is None else reference.batch_counts(spec, batch))
    reference.check_built(answer, cfg)


def bench_train(c) -> list[Result]:
    """One optimizer step (fwd+bwd + clipping + AdamW) with donated state, as the trainer runs it."""
    with reference.open_worker(c) as ref:
        return [_train_step(c, size, ref) for size in c.train.sizes]


def _train_step(c, size: str, ref) -> Result:
    import jax

    from fourm.config import load_config
    from fourm.model import build_model, loss_fn
    from fourm.model.layers import attention_impl
    from fourm.train.optimizer import make_optimizer
    from fourm.train.step import init_state, make_train_step

    cfg = model_config(c, size)
    model = build_model(cfg, seed=0)
    batch = model_batch(c, model.spec)
    flops = model_flops(cfg, batch)["fwd_bwd"]
    attention = attention_impl(cfg.attention_impl, cfg.dtype, cfg.dim // cfg.num_heads)
    optim = load_config("pretrain").optim
    tx, schedule = make_optimizer(optim, 1000)
    _build_reference(ref, size, cfg, model.spec, batch, train=dict(  # the same AdamW and clipping
        lr=optim.lr, betas=[optim.b1, optim.b2], eps=optim.eps, weight_decay=optim.weight_decay,
        clip_grad=optim.clip_grad))
    graphdef, state = init_state(model, tx)
    del model
    step = jax.jit(make_train_step(graphdef, loss_fn, tx, schedule), donate_argnums=0)
    holder = [state]

    def call():
        holder[0], metrics = step(holder[0], batch)
        return metrics["loss"]

    reset_peak_rss()
    t = time_calls(call, c.iters)
    tokens = c.model.batch * (c.model.input_tokens + c.model.target_tokens)
    r = Result(
        f"train.{size}.step", t.median_s, tokens / t.median_s, "tokens/s", flops=flops,
        first_s=t.first_s, cpu_s=t.cpu_s,
        note=f"{cfg.dtype}, {attention} attention; FLOPs = model forward+backward from XLA's "
             "cost analysis of an unrolled twin + analytic output heads (no remat recompute, "
             "optimizer not counted)",
        extra=dict(batch=c.model.batch, tokens=tokens, dtype=cfg.dtype, attention=attention))
    return _finish(reference.compare(r, call, ref, size, "train_step", c))


# ============================================================================================ generate
def bench_generate(c) -> list[Result]:
    """RGB -> depth (MaskGIT, cosine schedule) at each batch size and loop form, and the caption
    alone (RGB + depth -> caption, greedy, KV cache). Figures: steady-state time per call, samples/s
    (time per sample = 1 / throughput), compile time (first call - steady state) and the number of
    compiled MaskGIT step programs (loop auto/buckets) in `extra`. With a live reference, the first
    loop form's MaskGIT figures and the caption are also timed in ml-4m (GenerationSampler)."""
    with reference.open_worker(c) as ref:
        return _generate(c, ref)


def _generate(c, ref) -> list[Result]:
    from fourm import modalities as modreg
    from fourm.data.scenes import generate_scene
    from fourm.generate import stepwise
    from fourm.generate.chain import Generator, Target
    from fourm.model import build_model

    mods = modreg.resolve(list(c.model.modalities), c.model.family)
    rgb = next(m for m in mods if m.kind == "pixels")
    depth = next(m for m in mods if m.name.startswith("tok_depth"))
    caption = next(m for m in mods if m.kind == "sequence")
    g = c.generate
    buckets = int(g.buckets) or stepwise.DEFAULT_BUCKETS  # 0 in the config: fourm's default
    side = rgb.grid[0] * rgb.patch_size
    scene = generate_scene(0, 0, side)["rgb"][None]
    batches = [int(b) for b in g.batches]
    out = []
    for size in g.sizes:
        cfg = model_config(c, size)
        model = build_model(cfg, seed=0)
        _build_reference(ref, size, cfg, model.spec)
        t_depth = Target(depth.name, steps=g.steps, temperature=1.0)
        t_cap = Target(caption.name, max_new_tokens=g.caption_tokens, temperature=0.0)
        for form in g.loops:
            # "buckets:N" = the bucketed loop with N buckets (a sweep next to the default's).
            loop, _, nb = str(form).partition(":")
            nb = int(nb or buckets)
            gen = Generator(model, loop=loop, buckets=nb)
            for b in batches:
                img = np.repeat(scene, b, axis=0)
                name = f"generate.{size}.maskgit" + (f".b{b}" if b != 1 else "") \
                    + ("" if loop == "auto" else f".{loop}" + (f"{nb}" if loop == "buckets" else ""))
                programs0 = gen._step_fn._cache_size()
                reset_peak_rss()
                t = time_calls(lambda img=img: gen.generate({rgb.name: img}, [t_depth], seed=0,
                                                            decode=False).tokens, c.iters)
                extra = dict(batch=b, steps=g.steps, tokens=depth.num_tokens, dtype=cfg.dtype,
                             loop=loop, compile_s=max(t.first_s - t.median_s, 0.0),
                             per_sample_s=t.median_s / b)
                if loop in ("auto", "buckets"):
                    # Programs compiled for this batch size (the step is shared by all loops).
                    extra.update(buckets=nb, programs=gen._step_fn._cache_size() - programs0)
                recorded = _reference(c, f"generate.{size}.maskgit") if b == 1 and g.steps == 8 else None
                r = Result(
                    name, t.median_s, b / t.median_s, "samples/s", reference_s=recorded,
                    first_s=t.first_s, cpu_s=t.cpu_s, extra=extra,
                    note=f"{rgb.name} -> {depth.name} ({g.steps} steps, batch {b}, loop {loop}): "
                         f"compile {extra['compile_s']:.1f} s, {1e3 * t.median_s / b:.1f} ms/sample"
                         + (f", {extra['programs']} step programs" if "programs" in extra else ""))
                if form == g.loops[0]:  # one ml-4m counterpart per batch size
                    reference.compare(r, lambda img=img: gen.generate({rgb.name: img}, [t_depth], seed=0,
                                                                      decode=False).tokens,
                                      ref, size, "maskgit", c, args=dict(batch=b, steps=g.steps, temperature=1.0,
                                                                         schedule="cosine"))
                out.append(_finish(r))
        # The caption alone: its condition (RGB + depth tokens) is fixed, so only text is timed.
        gen = Generator(model, loop=g.loops[0], buckets=buckets)
        toks = gen.generate({rgb.name: scene}, [t_depth], seed=0, decode=False).tokens[depth.name]
        last = {}

        def call():
            last["gen"] = gen.generate({rgb.name: scene, depth.name: toks}, [t_cap], seed=0,
                                       decode=False)
            return last["gen"].tokens

        reset_peak_rss()
        t = time_calls(call, c.iters)
        generated = np.asarray(last["gen"].trace[caption.name]["length"]).tolist()
        extra = dict(batch=1, caption_tokens=g.caption_tokens, generated=generated, dtype=cfg.dtype,
                     compile_s=max(t.first_s - t.median_s, 0.0))
        r = Result(
            f"generate.{size}.caption", t.median_s, 1.0 / t.median_s, "samples/s",
            first_s=t.first_s, cpu_s=t.cpu_s, extra=extra,
            note=f"{rgb.name} + {depth.name} -> {caption.name} (greedy, KV cache, at most "
                 f"{g.caption_tokens} tokens, generated {generated}): compile "
                 f"{extra['compile_s']:.1f} s")
        out.append(_finish(reference.compare(r, call, ref, size, "caption", c,
                                             args=dict(batch=1, tokens=g.caption_tokens, temperature=0.0))))
    return out


# ============================================================================================ data
def bench_tokenizer(c) -> list[Result]:
    from fourm.bench import tokenizer

    t = c.tokenizer
    return tokenizer.run(list(t.recipes), [int(r) for r in t.resolutions], t.batch, c.iters,
                         t.captions, tiny=t.tiny)


def bench_divae(c) -> list[Result]:
    """4M's DiVAE diffusion decoder (fourm.compat.ml4m_tokenizers): one image, DDIM vs DDPM steps."""
    from fourm.bench import divae

    d = c.divae
    return [_finish(r) for r in divae.bench_divae_decode(d.arch, d.image_size, divae.parse_runs(list(d.runs)),
                                                         d.batch, c.iters, encoder_patch=d.encoder_patch)]


def bench_ml4m_tokenizer(c) -> list[Result]:
    """4M's tokenizers ported to JAX (fourm.compat.ml4m_tokenizers): ViT VQ-VAE encode."""
    from fourm.bench.ml4m_tokenizer import bench_vqvae_encode

    t = c.ml4m_tokenizer
    return [_finish(r) for r in bench_vqvae_encode(t.enc_type, int(t.image_size), int(t.patch_size),
                                                   int(t.batch), c.iters)]


def bench_scenes(c) -> list[Result]:
    from fourm.bench import scenes

    s = c.scenes
    out = []
    for res in (int(r) for r in s.resolutions):
        num = max(10 if c.quick else 40, int(s.num * (64 / res) ** 2))
        reset_peak_rss()
        rate = scenes.cpu_rate(res, num)
        out.append(_finish(Result(f"scenes.{res}.one_core", 1 / rate, rate, "scenes/s", cpu_s=1 / rate,
                                  note="per CPU-second of one process", extra=dict(num=num))))
        for w in (int(x) for x in s.workers):
            reset_peak_rss()
            rate = scenes.measure(res, w, num)
            out.append(_finish(Result(f"scenes.{res}.workers{w}", 1 / rate, rate, "scenes/s",
                                      note="wall clock, worker start included",
                                      extra=dict(num=num, workers=w,
                                                 children_peak_rss=children_peak_rss_bytes()))))
    return out


def bench_masking(c) -> list[Result]:
    from fourm.masking.__main__ import SCENE_MODALITIES, benchmark

    reset_peak_rss()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own summary
        rate = benchmark(c.masking.num)
    return [_finish(Result("masking.sample", 1 / rate, rate, "samples/s", cpu_s=1 / rate,
                           note="per CPU-second, one core",
                           extra=dict(num=c.masking.num, modalities=list(SCENE_MODALITIES), budgets=[64, 64])))]


def _image_tokenizers(names, resolution: int, kind: str) -> dict:
    from fourm import modalities as modreg
    from fourm.bench.shards import PatchQuantizer
    from fourm.bench.tokenizer import random_image_tokenizer

    toks = {}
    for name in names:
        m = modreg.get(name)
        if m.kind != "grid":
            continue
        if kind == "patch":
            toks[name] = PatchQuantizer(m.source, resolution // m.grid[0])
        elif kind in ("vq", "vq_tiny"):
            toks[name] = random_image_tokenizer(m.source, resolution, tiny=kind == "vq_tiny")
        else:
            raise ValueError(f"config.pretokenize.tokenizers: {kind!r}, expected vq, vq_tiny or patch")
    return toks


def bench_pretokenize(c) -> list[Result]:
    """Scenes already in memory -> image + text tokens -> ArrayRecord shards (+ manifest)."""
    from fourm import modalities as modreg
    from fourm.data.scenes import generate_scenes
    from fourm.tokenizers import pretokenize
    from fourm.tokenizers.text import TextTokenizer

    p = c.pretokenize
    samples = list(generate_scenes(0, 0, p.num, p.resolution, progress=False))
    text = TextTokenizer.train([s["caption"] for s in samples], None, dict(vocab_size=modreg.TEXT_VOCAB))
    toks = _image_tokenizers(p.modalities, p.resolution, p.tokenizers)
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(1 << 30))

        def call():  # a fresh output folder per call (pretokenize resumes otherwise)
            return pretokenize.pretokenize(samples, Path(tmp) / str(next(runs)), modalities=list(p.modalities),
                                           image_tokenizers=toks, text_tokenizer=text,
                                           shard_size=max(p.num // 4, 1), batch_size=p.batch, progress=False)

        reset_peak_rss()
        t = time_calls(call, c.iters)
    return [_finish(Result(f"pretokenize.{p.tokenizers}@{p.resolution}", t.median_s / p.num,
                           p.num / t.median_s, "samples/s", first_s=t.first_s, cpu_s=t.cpu_s / p.num,
                           note=(f"time per sample; scenes in memory, shards on local disk; "
                                 f"{t.cpu_s / t.median_s:.1f} of {os.cpu_count()} cores busy"),
                           extra=dict(num=p.num, modalities=list(p.modalities), call_s=t.median_s,
                                      cores_busy=t.cpu_s / t.median_s)))]


def bench_pipeline(c) -> list[Result]:
    """Shards -> decode -> masking -> batches through grain, with the trainer's pieces."""
    from fourm import modalities as modreg
    from fourm.bench.shards import DEFAULT_MODALITIES, make_scene_shards
    from fourm.masking import GrainMasking, MaskingTransform
    from fourm.masking.transform import default_config
    from fourm.data.shards import open_shards
    from fourm.train import input_pipeline
    from fourm.train.trainer import SelectModalities

    p = c.pipeline
    with tempfile.TemporaryDirectory() as tmp:
        make_scene_shards(tmp, num_scenes=p.num_scenes, shard_size=max(p.num_scenes // 4, 1))
        source, manifest = open_shards(tmp)
        names = list(DEFAULT_MODALITIES)
        vocab = {n: manifest["modalities"][n]["vocab_size"] for n in names
                 if manifest["modalities"][n].get("vocab_size") is not None}
        masking = MaskingTransform.from_config(default_config(), modreg.resolve(names, "fourm", vocab))
        ds = input_pipeline.build_dataset(source, transform=GrainMasking(masking), decode=SelectModalities(names),
                                          seed=0, global_batch=p.batch, process_index=0, process_count=1)
        reset_peak_rss()
        t0 = time.perf_counter()
        it = input_pipeline.to_iterator(ds, num_workers=p.num_workers, num_threads=p.num_threads)
        next(it)
        first = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(p.batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        del it
    return [_finish(Result("pipeline.batch", wall / p.batches, p.batches * p.batch / wall, "samples/s",
                           first_s=first, cpu_s=cpu / p.batches,
                           note=f"time per batch of {p.batch}; {p.num_threads} threads, "
                                f"{p.num_workers} workers",
                           extra=dict(batch=p.batch, batches=p.batches, budgets=[64, 64])))]


def bench_trainer(c) -> list[Result]:
    """The real trainer's step, input and checkpoint figures from fourm.bench.train (its owner's
    benchmark; run as a command because it defines absl flags and prints, writing --json)."""
    from fourm.config import CONFIG_DIR

    t = c.trainer
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train.json"
        cmd = [sys.executable, "-m", "fourm.bench.train", f"--config={CONFIG_DIR / 'pretrain.py'}:{t.variant}",
               f"--steps={t.steps}", f"--input_batches={t.input_batches}", f"--scenes={t.scenes}",
               f"--json={out}"]
        if compute_dtype(c) != "float32":
            cmd.append(f"--config.model.dtype={compute_dtype(c)}")
        proc = subprocess.run(cmd, env=os.environ.copy())
        if proc.returncode or not out.exists():
            raise RuntimeError(f"{' '.join(cmd[1:4])} failed (exit status {proc.returncode})")
        f = json.loads(out.read_text())
    peak = children_peak_rss_bytes()  # the largest child so far: this one when isolated
    base = f"trainer.{t.variant}"
    shared = dict(peak_rss=peak, peak_rss_cumulative=not c.isolate,
                  extra=dict(batch=f["batch"], params=f["params"], mesh=f["mesh"]))
    return [
        Result(f"{base}.step", f["step_s"], f["tokens_per_s"], "tokens/s", flops=f["model_flops_per_step"],
               note="full trainer step (mesh, shardings, donated state); analytic model FLOPs; "
                    f"compile {f['compile_s']} s", **shared),
        Result(f"{base}.input", f["input_batch_s"], f["input_examples_per_s"], "samples/s",
               note=f"grain + masking per batch of {f['batch']}: {100 * f['input_share_of_step']:.1f}% "
                    "of a step", **shared),
        Result(f"{base}.checkpoint", f["ckpt_total_s"], None, "", note=f"async save; blocks the loop "
               f"{f['ckpt_blocking_s']} s", **shared)]


def bench_finetune(c) -> list[Result]:
    """Fine-tuning vs scratch and the encoder as a backbone (fourm.bench.finetune): quality figures
    on held-out scenes; `seconds` is each run's training wall time."""
    from fourm.bench import finetune

    fig = finetune.run(c.finetune)
    print(finetune.format_figures(fig))
    out = []
    for group, runs in (("finetune.normals", fig["finetune"]), ("finetune.semseg", fig["backbone"])):
        for name, r in runs.items():
            if not isinstance(r, dict):
                continue
            out.append(Result(f"{group}.{name}", r["train_s"], None, "",
                              note=f"held-out loss {r['loss']:.4f}, accuracy {r['accuracy']:.4f}",
                              extra=dict(heldout_loss=r["loss"], heldout_accuracy=r["accuracy"])))
    return out


def bench_integrity(c) -> list[Result]:
    """Checkpoint durability window (save call -> finalised, with the loop stepping) under the
    trainer's default policy and fully async, and the shard sha256 verification cost."""
    from fourm.bench.integrity import durability_window, shard_verification

    g = c.integrity
    out = []
    for policy in (1, -1):
        with tempfile.TemporaryDirectory() as tmp:
            r = durability_window(Path(tmp) / "ck", state_mib=g.state_mib, work=g.work,
                                  durable_within_steps=policy, steps=g.steps)
        out.append(_finish(Result(
            f"integrity.ckpt_durable.within_{policy}".replace("-", "m"), r["window_s"],
            note=f"save call -> finalised, {r['state_bytes'] / 2**20:.0f} MiB state; the save blocks "
                 f"{r['blocked_s']:.3f} s; {r['steps_in_window']} steps ran in the window",
            extra=r)))
    s = shard_verification(num_scenes=g.scenes)
    out.append(_finish(Result("integrity.shard_sha256", s["verify_s"], s["bytes"] / s["verify_s"] / 1e6,
                              "MB/s", note=f"{s['shards']} shards; open without it "
                                           f"{s['open_without_s']:.3f} s", extra=s)))
    return out


def bench_startup(c) -> list[Result]:
    """Time to first result (fourm.bench.startup): fourm-generate / fourm-train / a tokenizer as
    fresh processes, cold (empty compilation cache) and warm, against the in-process work."""
    from fourm.bench.startup import run

    return [_finish(r) for r in run(Path(c.startup.workdir), rounds=c.startup.rounds)]


GROUPS: dict[str, Callable] = {
    "model": bench_model, "train": bench_train, "generate": bench_generate, "tokenizer": bench_tokenizer,
    "ml4m_tokenizer": bench_ml4m_tokenizer,
    "scenes": bench_scenes, "pretokenize": bench_pretokenize, "masking": bench_masking,
    "pipeline": bench_pipeline, "trainer": bench_trainer, "integrity": bench_integrity,
    "divae": bench_divae, "finetune": bench_finetune, "startup": bench_startup,
}


# ============================================================================================ runner
def check_groups(names) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; known: {list(GROUPS)}")
    return names


def run_group(name: str, c) -> list[Result]:
    results = GROUPS[name](c)
    dev = device_peak_bytes()  # accelerators: the process's peak so far (it cannot be reset)
    for r in results:
        if r.device_peak is None:
            r.device_peak = dev
    return results


def _run_isolated(name: str, c) -> list[Result]:
    """The group in a fresh interpreter; its output streams through, results come back as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "results.json"
        cfg_path.write_text(c.to_json())
        proc = subprocess.run([sys.executable, "-m", "fourm.bench.suite", str(cfg_path), name, str(out_path)],
                              env=os.environ.copy())
        if proc.returncode or not out_path.exists():
            raise RuntimeError(f"benchmark group {name!r} failed in its subprocess (exit status "
                               f"{proc.returncode}; its traceback is printed above)")
        return [Result.from_dict(d, f"{name} results") for d in json.loads(out_path.read_text())]


def run_suite(c, only=None, *, log=print) -> tuple[list[Result], dict[str, str]]:
    """Run the selected groups (default `c.only`); returns (results, {group: error} for failures)."""
    names = check_groups(only if only is not None else c.only)
    results, failed = [], {}
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rs = _run_isolated(name, c) if c.isolate else run_group(name, c)
        except Exception as e:  # noqa: BLE001 - one broken group must not lose the others' figures
            if not c.isolate:
                traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}"
            log(f"[{i + 1}/{len(names)}] {name} FAILED: {failed[name]}", flush=True)
            continue
        results += rs
        log(f"[{i + 1}/{len(names)}] {name} done in {time.perf_counter() - t0:.1f} s "
            f"({len(rs)} figures)", flush=True)
    return results, failed


def _worker(argv) -> int:
    """`python -m fourm.bench.suite CONFIG.json GROUP OUT.json` (what _run_isolated starts)."""
    import ml_collections

    if len(argv) != 3:
        print("usage: python -m fourm.bench.suite CONFIG.json GROUP OUT.json", file=sys.stderr)
        return 2
    cfg_path, name, out_path = argv
    from fourm.hostmem import keep_freed_memory

    keep_freed_memory()  # as fourm-train does, before JAX starts its thread pools
    c = ml_collections.ConfigDict(json.loads(Path(cfg_path).read_text()))
    results = run_group(name, c)
    atomic_write(out_path, json.dumps([r.to_dict() for r in results], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
