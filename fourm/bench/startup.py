"""Time to first result: what a user waits for a fresh process, cold and warm (issue 18).

    python -m fourm.bench.startup --workdir runs/quickstart [--json out.json]
    fourm-bench --only startup --config.startup.workdir=runs/quickstart

Three commands a user runs, each timed as a whole process (`python -m` the console script's
module, so interpreter start, imports, loading and compilation all count):
* `fourm-generate` on one held-out image: RGB -> depth + caption with the quickstart checkpoint;
* `fourm-train` from start to its first step (one step, on the quickstart's shards; the
  process also writes its final checkpoint and export, so its first step is timed apart: when
  the trainer's "first step done" line arrives);
* a tokenizer export: load + the first encode of one image.
Each runs *cold* (an empty JAX compilation cache, `FOURM_COMPILATION_CACHE=<new folder>`) and
then *warm* (a second process with that cache filled), `rounds` times, alternating; the median
is reported. The goal the warm figure is held to is the work itself: the same call repeated in
one process after compilation (`steady`) plus the process's own load time, measured here in
one in-process run of the same generation / step / encode. `warm / (load + steady)` is the
overhead a user still pays per process; cold - warm is what the persistent cache saves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fourm.bench.common import Result

_TIME_LINE = re.compile(r"time: load ([\d.]+) s, generate ([\d.]+) s \(compile ([\d.]+) s")
_FIRST_STEP = "first step done"  # fourm.train.trainer's log line


def _env(cache: Path) -> dict:
    env = dict(os.environ, FOURM_COMPILATION_CACHE=str(cache), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("XLA_FLAGS", None)  # one device: what a user's fresh shell has on a CPU
    return env


def _run(cmd: list[str], cache: Path, cwd: Path) -> tuple[float, str, float | None]:
    """(wall s, output, s from the start until a line with `_FIRST_STEP` arrived, or None)."""
    t0 = time.perf_counter()
    first_step = None
    lines = []
    with subprocess.Popen(cmd, env=_env(cache), cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            if first_step is None and _FIRST_STEP in line:
                first_step = time.perf_counter() - t0
            lines.append(line)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "".join(lines).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {p.returncode}: {' | '.join(tail)}")
    return wall, "".join(lines), first_step


def commands(workdir: Path, scratch: Path) -> dict[str, list[str]]:
    """The three user commands on a finished quickstart workdir."""
    from PIL import Image

    from fourm.data import scenes

    cfg = json.loads((workdir / "config.json").read_text())
    held = next(iter(scenes.generate_scenes(cfg["seed"], cfg["heldout_start"], 1,
                                            resolution=cfg["resolution"], workers=1, progress=False)))
    image = scratch / "image.png"
    Image.fromarray(held["rgb"]).save(image)
    py = sys.executable
    gen = [py, "-m", "fourm.cli.generate", "--checkpoint", str(workdir / "pretrain" / "export"),
           "--tokenizers", str(workdir / "tokenizers"), f"--cond=rgb={image}",
           "--targets=depth,caption", "--out", str(scratch / "generate")]
    train = [py, "-m", "fourm.cli.train", "--config", "pretrain:quickstart",
             f"--config.data.dir={workdir / 'pretokenize' / 'train'}", "--config.data.eval_dir=",
             "--config.num_train_steps=1", "--config.ckpt_every=1000", "--config.eval_every=0",
             f"--config.model.modalities={tuple(_modalities(workdir))}",
             f"--config.batch_size={cfg['pretrain_batch']}"]  # + --workdir, fresh per run
    tok = [py, "-c", _TOKENIZER_SNIPPET, str(workdir / "tokenizers" / "rgb"), str(image)]
    return {"generate": gen, "train": train, "tokenizer": tok}


# Load a tokenizer export and encode one image: the whole of a user's first tokenizer call.
_TOKENIZER_SNIPPET = """
import sys, numpy as np
from PIL import Image
from fourm.runtime import enable_compilation_cache
enable_compilation_cache()
from fourm.tokenizers import load
tok = load(sys.argv[1])
print(tok.encode(np.asarray(Image.open(sys.argv[2]).convert('RGB'))[None]).shape)
"""


def _modalities(workdir: Path) -> list[str]:
    mods = json.loads((workdir / "pretrain" / "export" / "config.json").read_text())["modalities"]
    return [m["name"] for m in mods]


def steady(workdir: Path, scratch: Path) -> dict[str, dict[str, float]]:
    """In one process: load time and the steady-state cost of the same calls."""
    import numpy as np
    from PIL import Image

    from fourm.generate.chain import Generator
    from fourm.generate.defaults import grid_target, text_target
    from fourm.model.pretrained import load_pretrained
    from fourm.tokenizers import load as load_image_tokenizer
    from fourm.tokenizers.export import peek_name
    from fourm.tokenizers.text import TextTokenizer

    cfg = json.loads((workdir / "config.json").read_text())
    rgb = np.asarray(Image.open(scratch / "image.png").convert("RGB"))[None]
    out = {}
    names = _modalities(workdir)
    depth = next(n for n in names if n.startswith("tok_depth@"))
    res_name = next(n for n in names if n.startswith("rgb@"))
    tok_root = workdir / "tokenizers"
    folders = {peek_name(d): d for d in sorted(tok_root.iterdir()) if d.is_dir()}
    t0 = time.perf_counter()  # what fourm-generate loads: the model and the tokenizers it needs
    toks = {depth: load_image_tokenizer(folders[depth]), "caption": TextTokenizer.load(tok_root / "text")}
    gen = Generator(load_pretrained(workdir / "pretrain" / "export"), toks)
    load_s = time.perf_counter() - t0
    targets = [grid_target(depth), text_target("caption")]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gen.generate({res_name: rgb}, targets, seed=0)
        times.append(time.perf_counter() - t0)
    out["generate"] = {"load_s": load_s, "steady_s": min(times[1:])}
    tok = load_image_tokenizer(folders[next(n for n in names if n.startswith("tok_rgb@"))])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.asarray(tok.encode(rgb))  # host values: the call has finished
        times.append(time.perf_counter() - t0)
    out["tokenizer"] = {"load_s": 0.0, "steady_s": min(times[1:])}
    # The trainer's steady step: the quickstart's own pretraining (wall / steps; its evals and
    # checkpoints included, so an upper bound).
    done = json.loads((workdir / "pretrain" / "DONE.json").read_text())
    out["train"] = {"load_s": 0.0, "steady_s": done["wall_s"] / max(1, int(cfg["pretrain_steps"]))}
    return out


def run(workdir: Path, rounds: int = 2, log=print) -> list[Result]:
    workdir = Path(workdir).resolve()
    if not (workdir / "pretrain" / "export" / "config.json").exists():
        raise FileNotFoundError(f"{workdir}: not a finished quickstart workdir (no pretrain/export); "
                                f"run fourm-quickstart --config.workdir={workdir} first")
    with tempfile.TemporaryDirectory(prefix="fourm-startup-") as tmp:
        scratch = Path(tmp)
        cmds = commands(workdir, scratch)
        walls: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in cmds}
        first_step: dict[str, list[float]] = {"cold": [], "warm": []}
        split: dict[str, list[tuple[float, ...]]] = {"cold": [], "warm": []}
        for r in range(rounds):
            for name, cmd in cmds.items():
                cache = scratch / f"cache_{name}_{r}"
                for kind in ("cold", "warm"):
                    # training gets a fresh workdir each time, so its step always runs
                    argv = cmd + [f"--workdir={scratch / f'train_{r}_{kind}'}"] if name == "train" else cmd
                    wall, out, first = _run(argv, cache, scratch)
                    walls[name][kind].append(wall)
                    if name == "train":
                        if first is None:
                            raise RuntimeError(f"fourm-train printed no {_FIRST_STEP!r} line")
                        first_step[kind].append(first)
                    m = _TIME_LINE.search(out) if name == "generate" else None
                    if m:
                        split[kind].append(tuple(float(v) for v in m.groups()))
                    log(f"[startup] round {r + 1}/{rounds} {name} {kind}: {wall:.1f} s")
        base = steady(workdir, scratch)
    results = []
    for name, kinds in walls.items():
        cold, warm = statistics.median(kinds["cold"]), statistics.median(kinds["warm"])
        extra = {"cold_s": kinds["cold"], "warm_s": kinds["warm"]}
        note = f"cold {cold:.1f} s, warm {warm:.1f} s (cache saves {cold - warm:.1f} s)"
        if name in base:
            work = base[name]["load_s"] + base[name]["steady_s"]
            extra.update(base[name], warm_over_work=warm / work)
            note += (f"; in-process load {base[name]['load_s']:.2f} s + steady {base[name]['steady_s']:.3f} s"
                     f" -> warm is {warm / work:.1f}x that")
        if name == "train":
            cold_first, warm_first = (statistics.median(first_step[k]) for k in ("cold", "warm"))
            extra.update(first_step_cold_s=first_step["cold"], first_step_warm_s=first_step["warm"])
            note += f"; its first step done after {cold_first:.1f} s cold, {warm_first:.1f} s warm"
        if name == "generate" and split["warm"]:
            extra["generate_split"] = {k: [dict(zip(("load_s", "generate_s", "compile_s"), v)) for v in vs]
                                       for k, vs in split.items()}
        results.append(Result(f"startup.{name}.warm", warm, note=note, first_s=cold, extra=extra))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fourm.bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/quickstart", help="a finished quickstart workdir")
    p.add_argument("--rounds", type=int, default=2, help="cold+warm pairs per command (median)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    results = run(Path(a.workdir), a.rounds)
    for r in results:
        print(f"{r.name}: {r.note}")
    if a.json:
        Path(a.json).write_text(json.dumps([r.__dict__ for r in results], indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
