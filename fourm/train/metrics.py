"""Metrics to TensorBoard (tensorboardX) and JSON lines, plus the progress bar. Process 0 writes.

`metrics.jsonl` has one object per line: {"step": int, "split": "train"|"eval", **scalars}. The
file is appended to (and flushed per write) so a resumed run continues the same file.

Exact across resumes: a run resumed from step S calls `resume_at(S)`, which rewrites the file
(atomically) without the rows after S, which the resumed run computes again, and opens
TensorBoard with `purge_step=S + 1`, which hides the earlier events after S. So each step shows
once. The trainer writes a checkpoint step's rows (and `flush`es) before saving it, so the rows of
the restored step are always there.
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

from fourm.io import atomic_write


def _scalar(v) -> float:
    return float(np.asarray(v))


class MetricWriter:
    def __init__(self, workdir: str | Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        self.workdir = Path(workdir)
        self._purge_step: int | None = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

    @property
    def path(self) -> Path:
        return self.workdir / "metrics.jsonl"

    def _tensorboard(self):
        # Opened at the first write, so that `resume_at` can still give it its purge step.
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / "tb"), flush_secs=30,
                                     purge_step=self._purge_step)
        return self._tb

    def resume_at(self, step: int) -> int:
        """The run continues after `step`: drop the rows of later steps (returns how many)."""
        if not self.enabled:
            return 0
        self._jsonl.close()
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        keep = []
        for line in lines:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                continue
            if row_step <= step:
                keep.append(line)
        dropped = len(lines) - len(keep)
        if dropped:
            atomic_write(self.path, "".join(line + "\n" for line in keep))
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = int(step) + 1
        return dropped

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            if self._tb is not None:
                self._tb.flush()

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        row = {k: _scalar(v) for k, v in scalars.items()}
        for k, v in row.items():
            if math.isfinite(v):  # TensorBoard tags allow [A-Za-z0-9_./-]: rgb@64 -> rgb_64
                self._tensorboard().add_scalar(re.sub(r"[^\w./-]", "_", f"{split}/{k}"), v, step)
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **{
            k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._tb = self._jsonl = None


def read_jsonl(path: str | Path, split: str | None = "train") -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def last_row(path: str | Path, step: int, split: str = "train") -> dict:
    """The row of `step` in `split` ({} when there is none), e.g. a finished run's final metrics."""
    path = Path(path)
    if not path.exists():
        return {}
    rows = [r for r in read_jsonl(path, split) if r.get("step") == step]
    return {k: v for k, v in rows[-1].items() if k not in ("step", "split")} if rows else {}


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
