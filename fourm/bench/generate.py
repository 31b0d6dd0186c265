"""Generation benchmark: RGB -> depth (MaskGIT, 8 cosine steps) -> caption (20 tokens, KV cache).

    python -m fourm.bench.generate [--batch 1,8] [--repeats 3] [--loops auto,scan,unrolled]

The model is the reference's tiny configuration (384 dim, 6+6 layers, SwiGLU) over its 4
modalities with 4M's vocabularies: rgb@224 pixels, tok_rgb@224, tok_depth@224, caption. Weights
are random (speed only; with random weights the caption may stop early at a stop token, the
generated length is printed). Compilation (first call per shape) is timed separately from
steady-state runs (median of --repeats). The PyTorch reference needs 1.0 s for the 8-step
MaskGIT on the 2-core CPU machine and re-runs its decoder for every caption token.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

flags.DEFINE_list("batch", ["1", "8"], "batch sizes")
flags.DEFINE_integer("repeats", 3, "timed runs after compilation")
flags.DEFINE_list("loops", ["auto", "scan", "unrolled"],
                  "MaskGIT loop forms to time (auto = bucketed steps | scan | unrolled)")
flags.DEFINE_integer("steps", 8, "MaskGIT steps")
flags.DEFINE_integer("caption_tokens", 20, "caption tokens")
flags.DEFINE_boolean("no_cache_caption", False, "also time the caption without KV cache")
FLAGS = flags.FLAGS

REFERENCE_MASKGIT_S = 1.0


def build(seed: int = 0):
    from fourm import modalities as modreg
    from fourm.model import build_model
    from fourm.model.sizes import model_config

    cfg = model_config("tiny")
    mods = modreg.resolve(["rgb@224", "tok_rgb@224", "tok_depth@224", "caption"], "ml4m")
    return build_model(cfg, mods, seed=seed)


def _time(fn, repeats):
    """(first call wall s, median wall s, median process CPU s) - CPU time is the steadier figure
    on a shared machine (it counts every thread of this process, so on 2 idle cores wall time is
    roughly CPU time / 2 for well-parallelised work)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, statistics.median(runs), statistics.median(cpus)


def main(argv):
    del argv
    import numpy as np

    from fourm.generate.chain import Generator, Target

    model = build()
    rows = []
    for loop in FLAGS.loops:
        gen = Generator(model, loop=loop)
        for b in (int(x) for x in FLAGS.batch):
            img = np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
            depth = Target("tok_depth@224", steps=FLAGS.steps, temperature=1.0)
            cap = Target("caption", max_new_tokens=FLAGS.caption_tokens, temperature=0.0)
            out = {}

            def mg():
                out["d"] = gen.generate({"rgb@224": img}, [depth], seed=0)

            def chain():
                out["c"] = gen.generate({"rgb@224": img}, [depth, cap], seed=0)

            c_mg, t_mg, cpu_mg = _time(mg, FLAGS.repeats)
            c_ch, t_ch, cpu_ch = _time(chain, FLAGS.repeats)
            n_cap = out["c"].trace["caption"]["length"].tolist()
            rows.append((loop, b, c_mg, t_mg, c_ch, t_ch, cpu_mg, cpu_ch))
            print(f"[{loop:8s}] batch {b}: MaskGIT-{FLAGS.steps} {t_mg:.3f} s wall / {cpu_mg:.3f} s "
                  f"CPU (first call incl. compile {c_mg:.1f} s) | chain depth+caption {t_ch:.3f} s "
                  f"wall / {cpu_ch:.3f} s CPU (first {c_ch:.1f} s) | generated {n_cap} tokens",
                  flush=True)
            if FLAGS.no_cache_caption:
                slow = Generator(model, loop=loop, kv_cache=False)
                c_nc, t_nc, cpu_nc = _time(
                    lambda: slow.generate({"rgb@224": img}, [depth, cap], seed=0), FLAGS.repeats)
                print(f"[{loop:8s}] batch {b}: chain without KV cache (the reference's algorithm "
                      f"for text) {t_nc:.3f} s wall / {cpu_nc:.3f} s CPU (first {c_nc:.1f} s)",
                      flush=True)
    print("\nsummary (steady state, seconds; ml-4m MaskGIT-8 recorded on another VM = "
          f"{REFERENCE_MASKGIT_S:.1f} s at batch 1; same-run: fourm-bench --reference_python):")
    print(f"{'loop':9s} {'B':>3s} {'maskgit':>8s} {'(cpu)':>8s} {'chain':>8s} {'(cpu)':>8s} "
          f"{'chain/sample':>13s} {'compile(maskgit)':>17s} {'compile(caption)':>17s}")
    for loop, b, c_mg, t_mg, c_ch, t_ch, cpu_mg, cpu_ch in rows:
        print(f"{loop:9s} {b:3d} {t_mg:8.3f} {cpu_mg:8.3f} {t_ch:8.3f} {cpu_ch:8.3f} {t_ch / b:13.3f} "
              f"{c_mg - t_mg:17.1f} {max(c_ch - t_ch, 0.0):17.1f}")
    print(f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
