"""Benchmark: `python -m fourm.masking [num_samples]` prints masked samples per second on one core.

Scene config of the brief: rgb@64 pixels, tok_rgb@64, tok_depth@64, caption; budgets 64/64,
mixture all2all + rgb2all (alpha 0.5).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from fourm import modalities
from fourm.masking.transform import MaskingTransform, collate

SCENE_MODALITIES = ["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]


def fake_scene_sample(rng: np.random.Generator, caption_len: int = 24) -> dict[str, np.ndarray]:
    """A sample with the shapes and dtypes the pre-tokenized scene data has."""
    return {
        "rgb@64": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "tok_rgb@64": rng.integers(0, 1024, (8, 8), dtype=np.int32),
        "tok_depth@64": rng.integers(0, 1024, (8, 8), dtype=np.int32),
        "caption": rng.integers(200, 4096, caption_len, dtype=np.int32),
    }


def benchmark(num_samples: int = 4000, seed: int = 0) -> float:
    transform = MaskingTransform(modalities.resolve(SCENE_MODALITIES), 64, 64)
    rng = np.random.default_rng(seed)
    samples = [fake_scene_sample(rng, int(rng.integers(5, 40))) for _ in range(64)]
    for s in samples[:8]:  # warm-up
        transform(s, rng)
    t0, c0 = time.perf_counter(), time.process_time()
    out = [transform(samples[j % len(samples)], np.random.default_rng(j)) for j in range(num_samples)]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    batch = collate(out[:8])
    rate = num_samples / dc
    # CPU time is the honest figure on a shared machine; wall time is shown next to it.
    print(f"masking {SCENE_MODALITIES}, budgets 64/64, {num_samples} samples (per-sample rng "
          f"included): {rate:.0f} samples/s per core by CPU time ({dc / num_samples * 1e6:.0f} us/sample), "
          f"{num_samples / dt:.0f} samples/s wall")
    print("batch of 8:", {k: (v.shape, str(v.dtype)) for k, v in batch.items()})
    return rate


if __name__ == "__main__":
    benchmark(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
