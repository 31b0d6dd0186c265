"""Roofline estimate of a compiled step's time per chip: the larger of compute time (FLOPs / peak
FLOP/s) and memory time (bytes moved / HBM bandwidth), from one table of accelerator peaks.

    est = roofline.estimate(flops=2.1e14, bytes_accessed=3.0e11, chip="v5p")
    est.step_s, est.bound  # 0.46 s, "compute"

Peaks are the vendors' dense bf16 figures per chip (TPU: per chip, both TensorCores). A roofline
time is a lower bound: real steps add collectives, launch gaps and imperfect overlap.
"""

from __future__ import annotations

import dataclasses

# chip -> (dense bf16 peak FLOP/s, HBM bandwidth bytes/s), per chip.
PEAKS = {
    "v4": (275e12, 1.228e12),
    "v5e": (197e12, 0.819e12),
    "v5p": (459e12, 2.765e12),
    "v6e": (918e12, 1.640e12),
    "h100": (989e12, 3.35e12),  # SXM
    "h200": (989e12, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class Roofline:
    chip: str
    flops: float  # per chip per step
    bytes_accessed: float  # per chip per step
    compute_s: float
    memory_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (the chip's ridge point is peak FLOP/s / bandwidth)."""
        return self.flops / self.bytes_accessed if self.bytes_accessed else float("inf")


def estimate(flops: float, bytes_accessed: float, chip: str) -> Roofline:
    if chip not in PEAKS:
        raise ValueError(f"no peak figures for chip {chip!r}; known: {sorted(PEAKS)}")
    peak, bandwidth = PEAKS[chip]
    return Roofline(chip, float(flops), float(bytes_accessed), float(flops) / peak,
                    float(bytes_accessed) / bandwidth)


def format_line(r: Roofline) -> str:
    peak, bandwidth = PEAKS[r.chip]
    return (f"roofline per chip ({r.chip}: {peak / 1e12:.0f} TFLOP/s bf16, {bandwidth / 1e12:.2f} "
            f"TB/s HBM): compute {r.compute_s * 1e3:.1f} ms, memory {r.memory_s * 1e3:.1f} ms -> "
            f">= {r.step_s * 1e3:.1f} ms/step ({r.bound}-bound, {r.intensity:.0f} FLOP/byte, "
            f"ridge {peak / bandwidth:.0f})")
