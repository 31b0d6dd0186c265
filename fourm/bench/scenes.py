"""Scene generator throughput: scenes per second by resolution and worker count.

    python -m fourm.bench.scenes                      # 64 and 224 px, 1 and 2 workers
    python -m fourm.bench.scenes --resolutions 64 --workers 2 --num 4000 --write

Rates include starting the worker processes (spawn), as a real run pays it. --write also times
generate + write of an aligned folder (PNG/NPY encoding included) into a temporary directory.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script: importing this module (tests, fourm-bench) must not
    # register flags whose names (num, seed) other commands own.
    flags.DEFINE_list("resolutions", ["64", "224"], "image sides to measure")
    flags.DEFINE_list("workers", ["1", "2"], "worker process counts to measure")
    flags.DEFINE_integer("num", 1000, "scenes per measurement at 64 px (scaled by (64/R)^2 for "
                         "larger R, min 40)")
    flags.DEFINE_integer("seed", 0, "dataset seed")
    flags.DEFINE_boolean("write", False, "also measure writing the aligned folder")


def measure(resolution: int, workers: int, num: int, seed: int = 0, write: bool = False) -> float:
    """Scenes per second (wall clock) generating `num` scenes (and writing them if `write`)."""
    from fourm.data import scenes

    t0 = time.perf_counter()
    if write:
        with tempfile.TemporaryDirectory() as tmp:
            scenes.export_scenes(os.path.join(tmp, "out"), seed, 0, num, resolution, workers=workers,
                                 progress=False)
            elapsed = time.perf_counter() - t0
    else:
        for _ in scenes.generate_scenes(seed, 0, num, resolution, workers=workers, progress=False):
            pass
        elapsed = time.perf_counter() - t0
    return num / elapsed


def cpu_rate(resolution: int, num: int, seed: int = 0) -> float:
    """Scenes per CPU-second of this process: what one free core delivers, however busy the
    machine is (wall-clock rates on a shared machine understate it)."""
    from fourm.data import scenes

    t0 = time.process_time()
    for i in range(num):
        scenes.generate_scene(seed, i, resolution)
    return num / (time.process_time() - t0)


def main(argv):
    del argv
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"scene generator benchmark ({os.cpu_count()} CPUs visible, load average {load})")
    for res in (int(r) for r in FLAGS.resolutions):
        num = max(40, int(FLAGS.num * (64 / res) ** 2))
        print(f"  {res:4d} px  one core      {num:5d} scenes  {cpu_rate(res, num, FLAGS.seed):8.1f} "
              "scenes per CPU-second")
        for w in (int(x) for x in FLAGS.workers):
            rate = measure(res, w, num, FLAGS.seed)
            print(f"  {res:4d} px  workers={w}  {num:5d} scenes  {rate:8.1f} scenes/s")
            if FLAGS.write:
                rate = measure(res, w, num, FLAGS.seed, write=True)
                print(f"  {res:4d} px  workers={w}  {num:5d} scenes  {rate:8.1f} scenes/s  "
                      "(generate + write folder)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
