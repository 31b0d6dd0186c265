"""`fourm-bench`: the benchmark suite in one command; a table, JSON, comparison across commits.

    fourm-bench                                   # everything at the reference shapes (CPU, fp32)
    fourm-bench --only model,scenes --json out.json
    fourm-bench --quick                           # small shapes: a CI smoke run
    fourm-bench --compare old.json --json new.json
    fourm-bench --only model,train,generate --reference_python /tmp/torchenv/bin/python \
                --reference_src /tmp/ml4m_src         # ml-4m side by side, same run
    fourm-bench --device gpu --json gpu.json      # configs/bench.py:gpu: bf16, cuDNN attention, 4M-B/L
                                                  # train step MFU (--peak_tflops, default 989 = H100/H200)

Prints, per figure: name | time | CPU time | throughput | peak mem | FLOPs | FLOP/s | [MFU |] vs
reference: with --reference_python/--reference_src, PyTorch ml-4m timed in the same run, the two
called alternately (fourm.bench.reference, docs/benchmarks.md); without, a ratio against ml-4m
seconds recorded on another VM, marked "recorded", where the shapes match. Groups:
model, train (train step at the model's shapes), generate, tokenizer, scenes, pretokenize, masking,
pipeline, trainer (the real trainer via fourm.bench.train), finetune (fine-tuning and the encoder as
a backbone vs scratch), divae (4M's DiVAE decode: DDIM vs DDPM;
only on request, `--only divae`); see fourm.bench.suite. Settings are
fields of configs/bench.py (`--config configs/bench.py:quick`, `--config.model.sizes=tiny`); the
plain flags are aliases of those fields and win over them. Exit status 1 when a group failed.
"""

from __future__ import annotations

import os

from absl import app, flags

from fourm.cli import entry, positive
from fourm.config import define_config_flag


# Figures include compile times: no persistent compilation cache unless --compilation_cache=DIR.
COMPILATION_CACHE_DEFAULT = "off"


def define_flags(fv, argv):
    define_config_flag("bench", fv, argv)
    d = dict(flag_values=fv)
    flags.DEFINE_list("only", None, "benchmark groups to run (model, train, generate, tokenizer, "
                      "ml4m_tokenizer, scenes, pretokenize, masking, pipeline, trainer, integrity, "
                      "finetune, divae); alias of config.only", **d)
    flags.DEFINE_list("skip", [], "benchmark groups to leave out", **d)
    flags.DEFINE_boolean("quick", False, "small shapes for a CI smoke run (= --config "
                         "configs/bench.py:quick)", **d)
    flags.DEFINE_enum("device", None, ["cpu", "gpu"], "cpu (fp32) or gpu (bf16, MFU); alias of "
                      "config.device", **d)
    flags.DEFINE_float("peak_tflops", None, "accelerator peak TFLOP/s for MFU (default 989 = "
                       "H100/H200 dense bf16); alias of config.peak_tflops", **d)
    flags.DEFINE_integer("iters", None, "timed calls per figure (median); alias of config.iters", **d)
    flags.DEFINE_boolean("isolate", None, "each group in a fresh process (own peak memory); alias of "
                         "config.isolate", **d)
    flags.DEFINE_string("reference_python", None, "interpreter of a venv with torch + ml-4m's "
                        "dependencies: time PyTorch ml-4m side by side in this run (docs/benchmarks.md); "
                        "alias of config.reference.python", **d)
    flags.DEFINE_string("reference_src", None, "an apple/ml-4m work tree (with --reference_python); "
                        "alias of config.reference.src", **d)
    flags.DEFINE_string("json", None, "write the results (and machine, commit, config) to this JSON "
                        "file", **d)
    flags.DEFINE_string("compare", None, "a JSON file an earlier run wrote: print time ratios "
                        "against it", **d)


def resolved_config(F):
    """configs/bench.py (quick variant with --quick), then config overrides, then plain flags."""
    from ml_collections.config_flags import config_path

    from fourm.config import load_config

    c = F.config
    # --quick, and --device gpu with the default variant, pick their variant of configs/bench.py.
    variant = "quick" if F.quick and not c.quick else \
        "gpu" if F.device == "gpu" and not c.quick and not c.get("variant") else None
    if variant:
        c = load_config(f"bench:{variant}")
        for path, value in F["config"].override_values.items():
            config_path.set_value(path, c, value)
    for flag, field in (("only", "only"), ("device", "device"), ("peak_tflops", "peak_tflops"),
                        ("iters", "iters"), ("isolate", "isolate")):
        if F[flag].value is not None:
            c[field] = F[flag].value
    for flag, field in (("reference_python", "python"), ("reference_src", "src")):
        if F[flag].value is not None:
            c.reference[field] = F[flag].value
    c.only = [g for g in c.only if g not in set(F.skip)]
    positive("--iters (config.iters)", int(c.iters))
    if not float(c.peak_tflops) > 0:
        raise app.UsageError(f"--peak_tflops (config.peak_tflops): got {c.peak_tflops}, expected a "
                             "positive number")
    return c


def _select_platform(device: str) -> None:
    # Before jax is imported anywhere: the platform (and the child processes') follows --device.
    # Without it a CPU machine with libtpu installed spends seconds probing for a TPU.
    os.environ["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda"


def run(argv, F) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"fourm-bench takes no positional arguments, got {argv[1:]}")
    c = resolved_config(F)
    _select_platform(c.device)
    if not c.isolate:
        # The groups run in this process: measure fourm as fourm-train and the isolated group
        # workers run it (glibc keeps freed memory), before JAX starts its thread pools.
        from fourm.hostmem import keep_freed_memory

        keep_freed_memory()

    from fourm.bench import common, reference, suite

    try:
        groups = suite.check_groups(c.only)
        reference.check_config(c)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    old = common.read_json(F.compare) if F.compare else None  # fail before hours of work
    import jax

    try:
        backend = jax.default_backend()
    except Exception as e:  # noqa: BLE001 - jax raises assorted errors when a platform is missing
        raise app.UsageError(f"--device {c.device}: jax cannot start platform "
                             f"{os.environ['JAX_PLATFORMS']!r} ({type(e).__name__}: {e}); on a GPU "
                             f"machine install jax[cuda]") from None
    if c.device == "gpu" and backend != "gpu":
        raise app.UsageError(f"--device gpu but jax runs on {backend!r} (install jax[cuda])")
    env = common.environment()
    print(f"fourm-bench: {len(groups)} group(s) on {env['device_kind']} ({env['backend']}, "
          f"{env['cpu_count']} CPUs, load average {env['load_average']}), {suite.compute_dtype(c)}, "
          f"commit {env['commit']}" + (" [quick]" if c.quick else ""), flush=True)
    results, failed = suite.run_suite(c, groups)
    peak = c.peak_tflops * 1e12 if c.device == "gpu" else None
    env_after = common.environment()
    print("\n" + common.format_table(results, peak))
    notes = [f"  {r.name}: {r.note}" for r in results if r.note]
    if notes:
        print("notes:\n" + "\n".join(notes))
    details = reference.format_details(results)
    if details:
        print(details)
    print(f"load average before {env['load_average']}, after {env_after['load_average']} "
          f"({env['cpu_count']} CPUs): timings on a shared machine are noisy")
    if failed:
        print("FAILED groups:\n" + "\n".join(f"  {k}: {v}" for k, v in failed.items()))
    if old:
        print("\n" + common.format_comparison(results, old[1], old[0]))
        differ = _settings_differ(old[0].get("config", {}), c.to_dict())
        if differ:
            print(f"warning: the old run used other settings for {differ}: same names, different work")
    if F.json:
        meta = dict(env, load_average_after=env_after["load_average"], config=c.to_dict(),
                    dtype=suite.compute_dtype(c), failed=failed, peak_flops=peak)
        print(f"wrote {common.write_json(F.json, results, meta)}")
    return 1 if failed else 0


def _settings_differ(old: dict, new: dict) -> list[str]:
    """Config sections that change what a figure measures (not which groups ran or how often)."""
    return [k for k in sorted(set(old) | set(new))
            if k not in ("only", "iters", "isolate", "peak_tflops") and old.get(k) != new.get(k)]


main = entry(__name__)


if __name__ == "__main__":
    main()
