"""Model step time at 4M's reference shapes: forward and forward+backward, tokens/s, FLOP/s.

    python -m fourm.bench.model                        # tiny and base, batch 8, fp32
    python -m fourm.bench.model --sizes tiny --batch 8 --iters 5 --head_impl dense

Shapes: batch 8, 128 input + 128 target tokens, modalities rgb@224 pixels + tok_rgb@224 +
tok_depth@224 + caption (4M's vocabularies 16384 / 8192 / 30000), budgets split per sample by a
Dirichlet(1) draw as 4M's masking does. Printed next to PyTorch ml-4m seconds recorded once on
another VM (fp32): tiny forward 0.48 s, forward+backward 1.52 s; base 2.9 s / 9.1 s. Those
ratios mix two machines; `fourm-bench --reference_python ... --reference_src ...` measures ml-4m
in the same run (docs/benchmarks.md).

Model FLOPs per step = XLA cost analysis of the jitted encoder+decoder (no head) + the output
heads counted exactly (2 T_m D V_m per modality for the forward, 3x that with the backward):
XLA's cost analysis counts a while-loop body once, and the chunked head is such a loop.

The process first makes glibc keep freed memory (`fourm.hostmem`; --nokeep_freed_memory
to measure without): otherwise every forward+backward step re-faults ~500 MB of fresh pages.
The "page faults" column is the minor page faults per step. --remat defaults to the model
config's policy ("dots_no_batch").
"""

from __future__ import annotations

import os
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fourm.model.fourm_model import head_impl
from fourm.model.synthetic import synthetic_batch

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Only when run as a script: importing this module (e.g. for synthetic_batch) must not
    # register flags whose names other commands own.
    flags.DEFINE_list("sizes", ["tiny", "base"], "model sizes")
    flags.DEFINE_integer("batch", 8, "batch size")
    flags.DEFINE_integer("input_tokens", 128, "encoder slots per sample")
    flags.DEFINE_integer("target_tokens", 128, "decoder slots per sample")
    flags.DEFINE_integer("iters", 5, "timed iterations (after one warm-up)")
    flags.DEFINE_string("dtype", "float32", "compute dtype")
    flags.DEFINE_string("head_impl", "", "chunked | dense (empty: the backend's default)")
    flags.DEFINE_integer("head_chunk", 128, "chunk size of the chunked head")
    flags.DEFINE_boolean("scan_layers", True, "scan over layers (False: unrolled)")
    flags.DEFINE_string("remat", "", "remat policy (empty: the model config's default)")
    flags.DEFINE_boolean("keep_freed_memory", True, "glibc malloc keeps freed memory "
                         "(fourm.hostmem); --nokeep_freed_memory measures the page-fault cost")


MODALITIES = ["rgb@224", "tok_rgb@224", "tok_depth@224", "caption"]
REFERENCE = {"tiny": (0.48, 1.52), "base": (2.9, 9.1)}  # PyTorch ml-4m, seconds per step


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _time(fn, args, iters: int) -> tuple[float, float, float]:
    """(median wall seconds, median process CPU seconds, page faults) per call, after a warm-up.

    CPU seconds are reported because this machine is shared: under load, wall time measures the
    neighbours; CPU time / cores is what the step would take with the cores to itself. Minor
    page faults per call show host memory being handed back and re-faulted (see hostmem)."""
    for _ in range(2):  # compile + warm-up; the second call lets the host heap settle
        jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    f0 = _minor_faults()
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu)), (_minor_faults() - f0) / iters


def _unrolled(cfg):
    c = cfg.copy_and_resolve_references()
    c.scan_layers = False
    return c


def bench_size(size: str) -> None:
    from flax import nnx

    from fourm.model import build_model, loss_fn, model_config

    cfg = model_config(size, "swiglu")
    cfg.family, cfg.modalities = "ml4m", MODALITIES
    cfg.update(dtype=FLAGS.dtype, head_impl=FLAGS.head_impl, head_chunk=FLAGS.head_chunk,
               scan_layers=FLAGS.scan_layers)
    if FLAGS.remat:
        cfg.remat = FLAGS.remat
    model = build_model(cfg, seed=0)
    spec = model.spec
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(
        spec, FLAGS.batch, FLAGS.input_tokens, FLAGS.target_tokens).items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)[0]

    # XLA counts a loop body once: cost-analyse an unrolled twin (same parameters) of the trunk.
    ugraph = nnx.graphdef(nnx.eval_shape(lambda: build_model(_unrolled(cfg), seed=0)))

    def trunk(params, batch):
        m = nnx.merge(ugraph, params, rest)
        return m.decode(m.encode(batch), batch)

    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    t_fwd = _time(fwd, (params, batch), FLAGS.iters)
    t_bwd = _time(fwd_bwd, (params, batch), FLAGS.iters)

    trunk_flops = float(jax.jit(trunk).lower(params, batch).cost_analysis().get("flops", 0.0))
    head_flops = 0.0
    for i in spec.targets:
        count = float(np.sum((np.asarray(batch["dec_mod"]) == i) & np.asarray(batch["dec_valid"])))
        head_flops += 2 * count * spec.dim * spec.modalities[i].vocab_size
    flops_fwd = trunk_flops + head_flops
    flops_bwd = 3 * flops_fwd
    tokens = FLAGS.batch * (FLAGS.input_tokens + FLAGS.target_tokens)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    ref = REFERENCE.get(size) if FLAGS.batch == 8 and FLAGS.dtype == "float32" else None
    print(f"\n{size}: dim {spec.dim}, {spec.encoder_depth}+{spec.decoder_depth} layers, "
          f"{n_params / 1e6:.1f}M params, batch {FLAGS.batch}, {FLAGS.input_tokens}+{FLAGS.target_tokens} "
          f"tokens, {FLAGS.dtype}, head {head_impl(FLAGS.head_impl)}, remat {spec.remat}")
    cores = os.cpu_count() or 1
    for label, (t, c, faults), fl, r in (("forward", t_fwd, flops_fwd, ref and ref[0]),
                                 ("forward+backward", t_bwd, flops_bwd, ref and ref[1])):
        line = (f"  {label:17s} {t:7.3f} s/step (cpu {c:6.2f} s)  {tokens / t:8.0f} tokens/s  "
                f"{fl / 1e9:6.1f} GFLOP/step  {fl / t / 1e9:6.1f} GFLOP/s  {faults:7.0f} page faults")
        if r:
            # Recorded once on another VM: not a same-run ratio (fourm-bench --reference_python is).
            line += (f"  | recorded PyTorch {r:.2f} s (another VM): {r / t:.2f}x throughput "
                     f"(cpu/{cores}: {r / (c / cores):.2f}x)")
        print(line)
    print(f"  (FLOPs: trunk {trunk_flops / 1e9:.1f} GFLOP from XLA cost analysis + heads "
          f"{head_flops / 1e9:.1f} GFLOP counted; backward taken as 2x forward)")


def main(argv):
    del argv
    if FLAGS.keep_freed_memory:  # before JAX starts its thread pools
        from fourm.hostmem import keep_freed_memory
        keep_freed_memory()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"fourm model benchmark: jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({os.cpu_count()} CPUs visible, load average {load:.1f}; timings are medians of wall time; "
          f"keep_freed_memory={FLAGS.keep_freed_memory})")
    for size in FLAGS.sizes:
        bench_size(size)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
