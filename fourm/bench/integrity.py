"""What integrity costs: the checkpoint durability window and the shard verification time.

    python -m fourm.bench.integrity --state_mib 256 --steps 20          # prints both figures
    fourm-bench --only integrity                                        # the same, as a suite group

Durability window = seconds from `Checkpointer.save` being called until the step is finalised on
disk (renamed into place: from then on a kill cannot lose it), measured by a thread polling for the
step folder while the loop keeps stepping, as the trainer does. Two policies: `durable_within_steps`
1 (the trainer's default: the loop waits at the next step boundary) and -1 (never waits; the write
competes with training for the CPU, which is where issue 17 saw 7-18 s). The "training" is a
stand-in update of the same state (matmuls over it, donated), so the write competes with real
compute; its size is set by `state_mib` and `work`.

Shard verification = `fourm.data.shards.verify_shards` (sha256 of every shard, threads) on
generated scene shards, against the cheap checks alone, in MB/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fourm.train import checkpointing


def synthetic_state(state_mib: float, seed: int = 0) -> dict:
    """A train-state-like pytree of float32 matrices ([1024, n] each) of about `state_mib` MiB."""
    cols = 1024
    total = max(1, int(state_mib * (1 << 20) / 4 / cols))
    sizes = [min(total - i, 4096) for i in range(0, total, 4096)]
    key = jax.random.key(seed)
    return {"params": {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (n, cols), jnp.float32)
                       for i, n in enumerate(sizes)},
            "step": jnp.zeros((), jnp.int32)}


def _stand_in_step(work: int):
    """A donated update costing `work` pairs of [256, 1024] x [1024, n] matmuls per matrix."""
    def update(state):
        def one(w):
            x = w[:256]
            for _ in range(work):
                x = jnp.tanh((x @ w.T) @ w * 1e-3)
            return w * 0.999 + 1e-3 * jnp.pad(x, ((0, w.shape[0] - x.shape[0]), (0, 0)))
        return {"params": jax.tree.map(one, state["params"]), "step": state["step"] + 1}
    return jax.jit(update, donate_argnums=0)


def durability_window(directory: str | Path, *, state_mib: float = 64, work: int = 1,
                      durable_within_steps: int = 1, steps: int = 20) -> dict:
    """Save at step 1, keep stepping; returns blocked_s (the save call), window_s (save call ->
    finalised), steps_in_window and step_s (median step time without a save)."""
    directory = Path(directory)
    state = synthetic_state(state_mib)
    step = _stand_in_step(work)
    state = step(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - t0)
    ck = checkpointing.Checkpointer(directory, async_save=True, durable_within_steps=durable_within_steps)
    ck.save(0, state, None, {})  # compiles the checksum program, outside the measurement
    ck.wait()
    final = directory / "1"
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            if final.is_dir():
                seen["t"] = time.perf_counter()
                return
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    ck.save(1, state, None, {})
    blocked = time.perf_counter() - t0
    steps_in_window = 0
    for i in range(steps):
        state = jax.block_until_ready(step(state))
        ck.step_boundary(2 + i)
        if "t" not in seen:
            steps_in_window += 1
    ck.wait()
    poller.join(timeout=60)
    stop.set()
    ck.close()
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state))
    window = seen.get("t", float("nan")) - t0
    return dict(state_bytes=nbytes, blocked_s=blocked, window_s=window, steps_in_window=steps_in_window,
                step_s=float(np.median(times)), durable_within_steps=durable_within_steps)


def shard_verification(directory: str | Path | None = None, *, num_scenes: int = 64,
                       shard_size: int = 16, repeats: int = 3) -> dict:
    """sha256 verification of a shard folder (generated scene shards when `directory` is None):
    seconds, bytes, MB/s, and the open time without it for comparison."""
    from fourm.data import shards

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(directory) if directory is not None else Path(tmp)
        if directory is None:
            from fourm.bench.shards import make_scene_shards
            make_scene_shards(d, num_scenes=num_scenes, shard_size=shard_size)
        manifest = shards.read_manifest(d)
        verify, cheap = [], []
        for _ in range(repeats):
            verify.append(shards.verify_shards(d, manifest)["seconds"])
            t0 = time.perf_counter()
            shards.open_shards(d, verify=False)
            cheap.append(time.perf_counter() - t0)
        nbytes = sum(int(s["bytes"]) for s in manifest["shards"])
    v = float(np.median(verify))
    return dict(bytes=nbytes, shards=len(manifest["shards"]), verify_s=v,
                mb_per_s=nbytes / v / 1e6 if v > 0 else float("inf"), open_without_s=float(np.median(cheap)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state_mib", type=float, default=64, help="checkpointed state size in MiB")
    p.add_argument("--work", type=int, default=1, help="stand-in step cost (matmuls per matrix)")
    p.add_argument("--steps", type=int, default=20, help="steps run after the save")
    p.add_argument("--shards", default=None, help="a shard folder to verify (default: generated)")
    p.add_argument("--scenes", type=int, default=64, help="scenes in the generated shards")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    out = {}
    for policy in (1, -1):
        with tempfile.TemporaryDirectory() as tmp:
            r = durability_window(Path(tmp) / "ck", state_mib=a.state_mib, work=a.work,
                                  durable_within_steps=policy, steps=a.steps)
        out[f"durability_within_{policy}"] = r
        print(f"checkpoint of {r['state_bytes'] / 2**20:.0f} MiB, durable_within_steps={policy:2d}: "
              f"save blocks {r['blocked_s'] * 1e3:.0f} ms, durable after {r['window_s']:.2f} s "
              f"({r['steps_in_window']} steps of {r['step_s'] * 1e3:.0f} ms ran in the window)")
    s = shard_verification(a.shards, num_scenes=a.scenes)
    out["shard_verification"] = s
    print(f"shard sha256 verification: {s['bytes'] / 1e6:.1f} MB in {s['shards']} shards, "
          f"{s['verify_s']:.3f} s = {s['mb_per_s']:.0f} MB/s (open without it: {s['open_without_s']:.3f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
