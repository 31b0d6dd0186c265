"""Metrics to TensorBoard (tensorboardX) and JSON lines, plus the progress bar. Process 0 writes.

`metrics.jsonl` has one object per line: {"step": int, "split": "train"|"eval", **scalars}. The
file is appended to (and flushed per write) so a resumed run continues the same file.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm


def _scalar(v) -> float:
    return float(np.asarray(v))


class MetricWriter:
    def __init__(self, workdir: str | Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tb"), flush_secs=30)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        row = {k: _scalar(v) for k, v in scalars.items()}
        for k, v in row.items():
            if math.isfinite(v):  # TensorBoard tags allow [A-Za-z0-9_./-]: rgb@64 -> rgb_64
                self._tb.add_scalar(re.sub(r"[^\w./-]", "_", f"{split}/{k}"), v, step)
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **{
            k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None


def read_jsonl(path: str | Path, split: str | None = "train") -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


class Progress:
    """tqdm bar over steps showing loss and tokens/s (of the whole job, all processes)."""

    def __init__(self, start: int, total: int, tokens_per_step: int, enabled: bool | None = None):
        enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = tqdm(total=total, initial=start, unit="step", disable=not enabled,
                         dynamic_ncols=True)
        self._tokens_per_step = tokens_per_step
        self._t = time.perf_counter()
        self._last_step = start

    def update(self, step: int, loss: float | None = None) -> float:
        """Advance to `step`; returns tokens/s since the last update."""
        now = time.perf_counter()
        steps = step - self._last_step
        rate = steps * self._tokens_per_step / max(now - self._t, 1e-9)
        self._t, self._last_step = now, step
        self._bar.update(steps)
        post = {"tok/s": f"{rate:,.0f}"}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        self._bar.set_postfix(post, refresh=False)
        return rate

    def close(self) -> None:
        self._bar.close()
