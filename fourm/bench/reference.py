"""PyTorch ml-4m measured in the same run: `fourm-bench --reference_python PY --reference_src DIR`.

    with reference.open_worker(c) as ref:            # None without config.reference.python
        ref.build("tiny", model=..., batch=batch_counts(spec, batch), train=...)
        live = reference.side_by_side(lambda: fn(params, batch), ref, "tiny", "fwd_bwd", c)
        reference.attach(result, live)

The reference side is fourm/bench/ml4m_reference_worker.py, run by another interpreter (a
scratch venv with torch and ml-4m's dependencies; docs/benchmarks.md) as one persistent process
per benchmark group. For each figure both sides run `rounds` rounds, alternately, the order
flipped every round (fourm first in even rounds, ml-4m first in odd ones), each side `iters`
timed calls after one untimed call per round (that call absorbs what the other process left
behind: its threads still spinning, caches, TLB). The figure is the median of the per-round
ratios ref / fourm (> 1: fourm is faster); both sides' medians, each round, each side's CPU time
and minor page faults per call, and the load average before and after go to the JSON.

Same work on both sides: the worker builds 4M's mod_dict with exactly the per-sample,
per-modality input and target token counts of fourm's batch (`batch_counts`), the model at the
same width, depths, heads and MLP width (checked against the worker's answer), the same AdamW
settings and gradient clipping, the same MaskGIT steps / temperature and caption length.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fourm.bench.common import Result, time_calls

WORKER = Path(__file__).with_name("ml4m_reference_worker.py")
MODALITIES = ("rgb@224", "tok_rgb@224", "tok_depth@224", "caption")  # what the worker builds


class ReferenceWorkerError(RuntimeError):
    """The reference worker could not start or answered with an error."""


class ReferenceWorker:
    """One persistent reference process; `request` sends a JSON line and reads the answer."""

    def __init__(self, python: str, src: str, *, script: str | Path = WORKER, args=(), timeout_s: float = 1800.0):
        self.timeout_s = float(timeout_s)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the project's `fourm` must not shadow ml-4m's
        cmd = [str(python), str(script), "--ml4m_src", str(src), *map(str, args)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        except OSError as e:
            raise ReferenceWorkerError(f"--reference_python {python}: cannot start it ({e})") from None
        first = self._read("starting")
        self.hello = first.get("hello", {})

    def _read(self, what: str) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else None
        if line is None:
            self.proc.kill()
            raise ReferenceWorkerError(f"reference worker: no answer to {what} within {self.timeout_s:.0f} s "
                                 "(config.reference.timeout_s)")
        if not line:
            code = self.proc.wait()
            raise ReferenceWorkerError(f"reference worker exited (status {code}) while {what}; its traceback is above")
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            raise ReferenceWorkerError(f"reference worker: not a JSON line in answer to {what}: {line[:200]!r}") from None
        if not isinstance(d, dict) or not d.get("ok"):
            err = d.get("error") if isinstance(d, dict) else d
            raise ReferenceWorkerError(f"reference worker, {what}: {err}")
        return d

    def request(self, op: str, **req) -> dict:
        what = f"{op} {req.get('key', '')} {req.get('figure', '')}".strip()
        try:
            self.proc.stdin.write(json.dumps(dict(op=op, **req)) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ReferenceWorkerError(f"reference worker exited (status {self.proc.wait()}) before {what}") from None
        return self._read(what)

    def build(self, key: str, **spec) -> dict:
        return self.request("build", key=key, **spec)

    def time(self, key: str, figure: str, iters: int, args: Mapping | None = None) -> dict:
        return self.request("time", key=key, figure=figure, iters=int(iters), warmup=1, args=dict(args or {}))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ReferenceWorkerError):
                self.request("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def worker_args(r) -> list[str]:
    """Command-line options of the worker from config.reference (threads, malloc)."""
    out = []
    if int(r.get("threads", 0)):
        out.append(f"--threads={int(r.threads)}")
    if int(r.get("interop_threads", 0)):
        out.append(f"--interop_threads={int(r.interop_threads)}")
    if r.get("keep_freed_memory", False):
        out.append("--keep_freed_memory")
    return out


@contextlib.contextmanager
def open_worker(c, script: str | Path | None = None):
    """The group's reference worker (None when config.reference.python is empty), closed after."""
    r = c.get("reference")
    if r is None or not r.get("python"):
        yield None
        return
    w = ReferenceWorker(r.python, r.src, script=script or r.get("worker", "") or WORKER, args=worker_args(r),
                        timeout_s=float(r.get("timeout_s", 1800)))
    try:
        yield w
    finally:
        w.close()


def check_config(c) -> None:
    """Raise ValueError (one line, names the field) when a live reference cannot be run."""
    r = c.get("reference")
    if r is None or not r.get("python"):
        return
    if not r.get("src"):
        raise ValueError("--reference_src (config.reference.src): empty; the live reference needs an ml-4m "
                         "work tree next to --reference_python")
    if not Path(r.python).exists():
        raise ValueError(f"--reference_python (config.reference.python): {r.python} does not exist")
    if not r.get("worker") and not (Path(r.src) / "fourm" / "models" / "fm.py").is_file():
        raise ValueError(f"--reference_src (config.reference.src): {r.src} has no fourm/models/fm.py "
                         "(expected a work tree of apple/ml-4m)")
    if not r.get("worker") and (tuple(c.model.modalities) != MODALITIES or c.model.family != "ml4m"
                                or c.device != "cpu"):
        raise ValueError(f"the live reference runs 4M's modalities {list(MODALITIES)} (family ml4m) on the CPU; "
                         f"got config.model.modalities={list(c.model.modalities)}, family "
                         f"{c.model.family!r}, device {c.device!r}")
    if int(r.rounds) < 1:
        raise ValueError(f"config.reference.rounds: got {r.rounds}, expected >= 1")


# ------------------------------------------------------------------------------------ same work
def batch_counts(spec, batch: Mapping[str, Any]) -> dict:
    """Per modality name, per sample: how many input and target tokens fourm's batch holds."""
    enc_mod, enc_valid = np.asarray(batch["enc_mod"]), np.asarray(batch["enc_valid"])
    dec_mod, dec_valid = np.asarray(batch["dec_mod"]), np.asarray(batch["dec_valid"])
    names = [m.name for m in spec.modalities]
    enc = {names[i]: [int(x) for x in ((enc_mod == i) & enc_valid).sum(1)] for i in spec.inputs}
    dec = {names[i]: [int(x) for x in ((dec_mod == i) & dec_valid).sum(1)] for i in spec.targets}
    return dict(size=int(enc_mod.shape[0]), input_tokens=int(enc_mod.shape[1]), target_tokens=int(dec_mod.shape[1]),
                enc_counts=enc, dec_counts=dec)


def model_spec(cfg) -> dict:
    return dict(dim=int(cfg.dim), encoder_depth=int(cfg.encoder_depth), decoder_depth=int(cfg.decoder_depth),
                num_heads=int(cfg.num_heads), mlp_ratio=float(cfg.mlp_ratio))


def check_built(answer: Mapping, cfg) -> None:
    """The worker's model has fourm's shapes (its MLP width is computed by 4M's own rule)."""
    from fourm.model.sizes import mlp_hidden_dim

    hidden = int(cfg.mlp_hidden) or mlp_hidden_dim(int(cfg.dim), float(cfg.mlp_ratio), bool(cfg.gated_mlp))
    got = (answer.get("dim"), answer.get("encoder_depth"), answer.get("decoder_depth"), answer.get("mlp_hidden"))
    want = (int(cfg.dim), int(cfg.encoder_depth), int(cfg.decoder_depth), hidden)
    if tuple(got) != want:
        raise ReferenceWorkerError(f"reference model shapes (dim, depths, MLP width) {got} differ from fourm's {want}")


# ------------------------------------------------------------------------------------ alternation
def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def side_by_side(fourm_call: Callable[[], Any], ref: ReferenceWorker, key: str, figure: str, *, rounds: int,
                 iters: int, args: Mapping | None = None, log=print) -> dict:
    """Alternate the two sides for `rounds` rounds, order flipped each round; per-round medians,
    the median of per-round ratios ref / fourm, CPU s and page faults per call, load average."""
    load_start = [round(x, 2) for x in os.getloadavg()]
    per_round = []
    for i in range(int(rounds)):
        order = ("fourm", "ref") if i % 2 == 0 else ("ref", "fourm")
        row = dict(order=list(order))
        for side in order:
            if side == "fourm":
                f0 = _faults()
                t = time_calls(fourm_call, iters)
                row.update(fourm_s=t.median_s, fourm_times=t.times, fourm_cpu_s=t.cpu_s,
                           fourm_faults_per_call=(_faults() - f0) / (iters + 1))
            else:
                a = ref.time(key, figure, iters, args)
                row.update(ref_s=statistics.median(a["times"]), ref_times=a["times"],
                           ref_cpu_s=statistics.median(a["cpu"]), ref_faults_per_call=a["faults"] / a["calls"],
                           ref_output_shape=a.get("output_shape"))
        row["ratio"] = row["ref_s"] / row["fourm_s"]
        per_round.append(row)
        log(f"    {key}.{figure} round {i + 1}/{rounds} ({' then '.join(order)}): fourm {row['fourm_s']:.4f} s, "
            f"ml-4m {row['ref_s']:.4f} s, ratio {row['ratio']:.2f}", flush=True)
    med = lambda k: statistics.median(r[k] for r in per_round)  # noqa: E731
    return dict(source="same run", figure=figure, rounds=per_round, iters=int(iters), ratio=med("ratio"),
                fourm_s=med("fourm_s"), ref_s=med("ref_s"), fourm_cpu_s=med("fourm_cpu_s"),
                ref_cpu_s=med("ref_cpu_s"), fourm_faults_per_call=med("fourm_faults_per_call"),
                ref_faults_per_call=med("ref_faults_per_call"), load_start=load_start,
                load_end=[round(x, 2) for x in os.getloadavg()], worker=dict(ref.hello), args=dict(args or {}))


def attach(result: Result, live: dict | None) -> Result:
    """Put a side-by-side measurement on `result`: reference_s, reference_ratio, extra["reference"]."""
    if live is not None:
        result.reference_s, result.reference_ratio = live["ref_s"], live["ratio"]
        result.reference_source = "same run"
        result.extra["reference"] = live
    return result


def compare(result: Result, fourm_call, ref: ReferenceWorker | None, key: str, figure: str, c,
            args: Mapping | None = None) -> Result:
    """`attach(result, side_by_side(...))` when a worker is open; the result unchanged otherwise."""
    if ref is None:
        return result
    print(f"  same-run reference: {result.name} vs ml-4m {figure} ({c.reference.rounds} rounds x {c.iters} calls)",
          flush=True, file=sys.stdout)
    return attach(result, side_by_side(fourm_call, ref, key, figure, rounds=int(c.reference.rounds),
                                       iters=int(c.iters), args=args))


def format_details(results) -> str:
    """One line per same-run figure: per-round ratios, CPU seconds and page faults per call on
    each side, load average before and after; then the worker's torch and thread settings."""
    lines, hello = [], None
    for r in results:
        live = r.extra.get("reference") if r.reference_ratio is not None else None
        if not live:
            continue
        hello = live.get("worker") or hello
        ratios = ", ".join(f"{x['ratio']:.2f}" for x in live["rounds"])
        lines.append(f"  {r.name}: ml-4m/fourm {live['ratio']:.2f}x (rounds: {ratios}); CPU s/call ml-4m "
                     f"{live['ref_cpu_s']:.3f} fourm {live['fourm_cpu_s']:.3f}; page faults/call ml-4m "
                     f"{live['ref_faults_per_call']:.0f} fourm {live['fourm_faults_per_call']:.0f}; load "
                     f"{live['load_start'][0]} -> {live['load_end'][0]}")
    if not lines:
        return ""
    cores = os.cpu_count() or 1
    busy = max(max(r.extra["reference"]["load_start"][0], r.extra["reference"]["load_end"][0])
               for r in results if r.reference_ratio is not None and "reference" in r.extra)
    if busy > 1.5 * cores:
        lines.append(f"  WARNING: load average up to {busy} on {cores} cores: oversubscribed, PyTorch's OpenMP "
                     "threads spin at every barrier while a sibling is preempted, so these ratios measure "
                     "the neighbours, not the two implementations (docs/benchmarks.md)")
    h = hello or {}
    head = (f"same-run reference (ml-4m, torch {h.get('torch', '?')}, {h.get('threads', '?')} threads, "
            f"{h.get('interop_threads', '?')} inter-op, keep_freed_memory={h.get('keep_freed_memory', '?')}):")
    return "\n".join([head] + lines)
