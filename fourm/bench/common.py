"""Shared pieces of the benchmarks: one result record, timing, peak memory, XLA FLOPs, the table.

    r = Result("model.tiny.fwd", seconds=t.median_s, throughput=tokens / t.median_s,
               unit="tokens/s", flops=flops, reference_s=0.48)
    print(format_table([r]))

Every benchmark returns `Result`s (plain data, JSON round-trip) so the suite can print one table,
write JSON for comparison across commits and compare two such files.

Peak memory is the process RSS high-water mark. On Linux `reset_peak_rss()` zeroes it (writing
"5" to /proc/self/clear_refs) so each benchmark reports its own peak, not the largest one run
before it in the same process; where that is not allowed the mark is cumulative and `Result.
peak_rss_cumulative` says so. Device memory stats (GPU/TPU) are read where jax has them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fourm.io import atomic_write

SCHEMA = "fourm-bench/1"  # of the JSON files --json writes and --compare reads


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Result:
    """One measured figure. `seconds` = steady-state wall time of one call (median)."""

    name: str  # dotted, e.g. "model.tiny.fwd_bwd"; the key --compare matches on
    seconds: float
    throughput: float | None = None  # items per second
    unit: str = ""  # of throughput, e.g. "tokens/s"
    peak_rss: int | None = None  # bytes, process RSS high-water mark during the benchmark
    peak_rss_cumulative: bool = False  # True: the mark could not be reset (includes earlier work)
    device_peak: int | None = None  # bytes, jax device peak_bytes_in_use (accelerators)
    flops: float | None = None  # per call (XLA cost analysis; see the benchmark's note)
    reference_s: float | None = None  # PyTorch ml-4m, same shapes (reference_source says where from)
    reference_ratio: float | None = None  # same run: median of per-round ratios ref / fourm
    reference_source: str = ""  # "same run" (fourm.bench.reference) | "" = seconds recorded elsewhere
    first_s: float | None = None  # first call (compilation included)
    cpu_s: float | None = None  # process CPU time per steady-state call (all threads)
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def flops_per_s(self) -> float | None:
        return self.flops / self.seconds if self.flops and self.seconds > 0 else None

    def mfu(self, peak_flops: float | None) -> float | None:
        """Model FLOP utilisation against `peak_flops` (FLOP/s), e.g. 989e12 for H100 bf16."""
        f = self.flops_per_s
        return f / peak_flops if f and peak_flops else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flops_per_s"] = self.flops_per_s
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "result") -> "Result":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "seconds") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; got {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    first_s: float  # first call: compilation + one run
    median_s: float
    min_s: float
    cpu_s: float  # median process CPU seconds per call
    times: list[float]


def _ready(x):
    """Block on jax arrays (asynchronous dispatch) and leave anything else alone."""
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        return x
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int = 1) -> Timing:
    """Wall and CPU time of `fn()`: `warmup` untimed calls (the first one timed as `first_s`),
    then `iters` timed calls; the median is the figure (robust to a noisy shared machine)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    t0 = time.perf_counter()
    _ready(fn())
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        _ready(fn())
    walls, cpus = [], []
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        _ready(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return Timing(first, statistics.median(walls), min(walls), statistics.median(cpus), walls)


# ------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Zero the RSS high-water mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark of this process: VmHWM (honours reset_peak_rss), else getrusage."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is kB on Linux, bytes on macOS
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if os.uname().sysname == "Darwin" else r * 1024)
    return kb * 1024


def current_rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def children_peak_rss_bytes() -> int:
    """Largest RSS high-water mark of any waited-for child process (e.g. scene workers)."""
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first local jax device, where the backend reports it (not CPU)."""
    try:
        import jax
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats raise or return None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ------------------------------------------------------------------------------------ FLOPs
def xla_flops(fn: Callable, *args, **kwargs) -> float | None:
    """FLOPs of one call of `jax.jit(fn)(*args)` by XLA's HLO cost analysis of the lowered program.

    Caveat (why callers count some parts themselves): the analysis counts the body of a while loop
    once, whatever its trip count, so a lax.scan over layers or a chunked loop is undercounted.
    Callers lower an unrolled twin of scanned code for counting. The lowered (pre-optimisation)
    module is analysed: it needs no compilation and has the same dot/conv FLOPs.
    """
    import jax

    try:
        cost = jax.jit(fn).lower(*args, **kwargs).cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ------------------------------------------------------------------------------------ environment
def git_commit(repo: str | Path | None = None) -> str:
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """What the figures depend on besides the code: machine, load, library versions."""
    import platform

    import jax
    import numpy as np

    dev = jax.local_devices()[0]
    return dict(
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), commit=git_commit(), python=platform.python_version(),
        jax=jax.__version__, numpy=np.__version__, backend=jax.default_backend(),
        device_kind=getattr(dev, "device_kind", str(dev)), device_count=jax.device_count(),
        cpu_count=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()],
        host=platform.node())


# ------------------------------------------------------------------------------------ output
def human(x: float | None, unit: str = "", base: int = 1000) -> str:
    """1.23e9 -> '1.23 G<unit>'."""
    if x is None:
        return "-"
    prefixes = ["", "k", "M", "G", "T", "P"] if base == 1000 else ["", "Ki", "Mi", "Gi", "Ti", "Pi"]
    i = 0
    while abs(x) >= base and i < len(prefixes) - 1:
        x /= base
        i += 1
    digits = 3 if abs(x) < 10 else (1 if abs(x) < 100 else 0)
    return f"{x:.{digits}f} {prefixes[i]}{unit}".strip()


def seconds_str(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


SAME_RUN_NOTE = ("same run: ml-4m (PyTorch, its own process) and fourm called alternately in this run, the "
                 "order flipped every round; the ratio is the median of per-round ratios of medians")
RECORDED_NOTE = ("recorded: ml-4m seconds timed once on another, slower VM (fourm.bench.suite.REFERENCE_S), "
                 "not in this run, so not a same-run ratio; --reference_python/--reference_src measure "
                 "ml-4m side by side (docs/benchmarks.md)")


def reference_cell(r: Result) -> str:
    """The "vs reference" column: a same-run ratio, or a recorded one marked as such."""
    if r.reference_ratio is not None:
        live = r.extra.get("reference", {})
        return (f"{r.reference_ratio:.2f}x same run (ml-4m {seconds_str(r.reference_s)} / fourm "
                f"{seconds_str(live.get('fourm_s'))}, {len(live.get('rounds', []))} rounds)")
    if r.reference_s:
        return f"{r.reference_s / r.seconds:.2f}x recorded (ref {seconds_str(r.reference_s)})"
    return "-"


def format_table(results: Sequence[Result], peak_flops: float | None = None) -> str:
    """name | time | CPU time | throughput | peak mem | FLOPs | FLOP/s | [MFU |] vs reference.

    vs reference: with a same-run reference (fourm.bench.reference) the median of per-round
    ratios ml-4m / fourm; a ratio against recorded seconds says "recorded" and a footnote says
    where they come from.

    CPU time = process CPU seconds per call (all threads): on a shared machine, wall time / CPU
    time shows how much of the machine the benchmark actually got."""
    head = ["name", "time", "CPU time", "throughput", "peak mem", "FLOPs", "FLOP/s"]
    head += ["MFU"] if peak_flops else []
    head += ["vs reference (ml-4m / fourm)"]
    rows = []
    for r in results:
        tp = f"{human(r.throughput)} {r.unit}".strip() if r.throughput is not None else "-"
        mem = human(r.peak_rss, "B", 1024) + ("*" if r.peak_rss_cumulative else "")
        if r.device_peak is not None:
            mem += f" (dev {human(r.device_peak, 'B', 1024)})"
        row = [r.name, seconds_str(r.seconds), seconds_str(r.cpu_s), tp, mem, human(r.flops),
               human(r.flops_per_s, "/s")]
        if peak_flops:
            m = r.mfu(peak_flops)
            row.append("-" if m is None else f"{100 * m:.{1 if m >= 0.01 else 2}f}%")
        row.append(reference_cell(r))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if any(r.peak_rss_cumulative for r in results):
        lines.append("* peak RSS could not be reset between benchmarks: includes earlier ones")
    if any(r.reference_ratio is not None for r in results):
        lines.append(SAME_RUN_NOTE)
    if any(r.reference_s and r.reference_ratio is None for r in results):
        lines.append(RECORDED_NOTE)
    return "\n".join(lines)


def write_json(path: str | Path, results: Sequence[Result], meta: Mapping[str, Any]) -> Path:
    """Atomic write (tmp + rename) of {"schema", "meta", "results"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(dict(schema=SCHEMA, meta=dict(meta), results=[r.to_dict() for r in results]),
                      indent=2, default=str)
    return atomic_write(path, blob + "\n")


def read_json(path: str | Path) -> tuple[dict, list[Result]]:
    """(meta, results) of a file `write_json` wrote; errors name the file and the field."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        got = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: schema {got!r}, expected {SCHEMA!r} (a file fourm-bench --json wrote)")
    if not isinstance(d.get("results"), list):
        raise ValueError(f"{path}: field 'results' must be a list")
    return d.get("meta", {}), [Result.from_dict(r, f"{path} results[{i}]") for i, r in enumerate(d["results"])]


def format_comparison(new: Sequence[Result], old: Sequence[Result], old_meta: Mapping | None = None) -> str:
    """Per benchmark present in both: old time, new time and speed-up (old / new; > 1 = faster)."""
    old_by = {r.name: r for r in old}
    rows = []
    for r in new:
        o = old_by.get(r.name)
        if o is None or not o.seconds or not r.seconds:
            continue
        mem = f"{r.peak_rss / o.peak_rss:.2f}x" if r.peak_rss and o.peak_rss else "-"
        rows.append([r.name, seconds_str(o.seconds), seconds_str(r.seconds), f"{o.seconds / r.seconds:.2f}x", mem])
    only_old = sorted(set(old_by) - {r.name for r in new})
    head = ["name", "old time", "new time", "speed-up", "peak mem new/old"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    fmt = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = "comparison with " + (f"commit {old_meta.get('commit')} ({old_meta.get('time')})"
                                  if old_meta else "the old file")
    lines = [title, fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(x) for x in rows]
    if not rows:
        lines.append("(no benchmark names in common)")
    if only_old:
        lines.append(f"only in the old file: {', '.join(only_old)}")
    return "\n".join(lines)
