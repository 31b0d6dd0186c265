"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU-only machine.

libtpu's compiler is driven through `jax.experimental.topologies`: it describes the devices of a
pod slice without owning them, so `jit(...).lower(abstract args).compile()` runs the TPU compiler
here and reports memory per chip, FLOPs and the collectives, before any hardware is rented.

Topology syntax (`--topology`): the Cloud TPU accelerator-type name, `v5p-128`, `v4-64`,
`v5litepod-16` / `v5e-16`, `v6e-64` (for v4/v5p the number counts TensorCores, two per chip; for
v5e/v6e it counts chips), or an explicit chip grid `v5p:4x4x4`, `v5e:4x8`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

from fourm.model.sizes import mlp_hidden_dim
from fourm.train import roofline
from fourm.train.plan import build_plan

# Chip grids Cloud TPU uses per chip count (3-D torus generations and 2-D ones).
_GRID_3D = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
            128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16",
            4096: "16x16x16", 6144: "16x16x24", 8960: "16x20x28"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
# generation -> (libtpu name, TensorCores per chip counted in the accelerator-type number, 3-D?)
_GENERATIONS = {"v4": ("v4", 2, True), "v5p": ("v5p", 2, True), "v5e": ("v5e", 1, False),
                "v5litepod": ("v5e", 1, False), "v6e": ("v6e", 1, False)}
# HBM per chip (bytes), for the "fits" column.
HBM_BYTES = {"v4": 32 << 30, "v5p": 95 << 30, "v5e": 16 << 30, "v6e": 32 << 30}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str  # libtpu's name: v4, v5p, v5e, v6e
    grid: str  # chip grid, e.g. 4x4x4
    num_chips: int

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{self.grid}"

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]


def parse_topology(name: str) -> Topology:
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)[:=]((?:\d+x)+\d+)", name)
    if m:
        gen = _GENERATIONS[m.group(1)][0]
        return Topology(name, gen, m.group(2), math.prod(int(x) for x in m.group(2).split("x")))
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"--topology {name!r}: expected an accelerator type like v5p-128, v4-64, "
                         "v5e-16, v6e-64, or a chip grid like v5p:4x4x4")
    gen, per_chip, is_3d = _GENERATIONS[m.group(1)]
    n = int(m.group(2))
    if n % per_chip:
        raise ValueError(f"--topology {name!r}: {m.group(1)} counts {per_chip} cores per chip; "
                         f"{n} is not a multiple")
    chips = n // per_chip
    grids = _GRID_3D if is_3d else _GRID_2D
    if chips not in grids:
        raise ValueError(f"--topology {name!r}: no standard {gen} slice has {chips} chips; "
                         f"known chip counts: {sorted(grids)} (or give a grid, e.g. {gen}:4x4x4)")
    return Topology(name, gen, grids[chips], chips)


def topology_devices(topo: Topology) -> list[Any]:
    """The slice's TPU devices, described by libtpu (no TPU needed)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError("AOT compilation for TPU needs libtpu: pip install 'libtpu==0.0.42.*' "
                           "(the version jax 0.10.2 pins; the fourm[tpu] extra brings it)") from e
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name)
    return list(desc.devices)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the optimised HLO contains (async start ops counted once)."""
    counts = {}
    for op in _COLLECTIVES:
        n = len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", hlo_text))
        if n:
            counts[op] = n
    return counts


def model_flops_per_step(model_cfg, modalities, n_enc: int, n_dec: int, batch: int) -> float:
    """Model FLOPs of one update step (forward + backward = 3x forward), analytic.

    The usual "model FLOPs" (as in MFU): matmuls of the encoder and decoder blocks, attention
    scores and mixing, and the output heads; no remat recompute. Needed because XLA's cost
    analysis counts a while-loop body once, so scanned layers and chunked heads are undercounted.
    Head cost uses the mean vocabulary of the target modalities (budgets split evenly on average).
    """
    d = int(model_cfg.dim)
    gated = bool(model_cfg.get("gated_mlp", True))
    h = int(model_cfg.get("mlp_hidden") or 0) or mlp_hidden_dim(d, float(model_cfg.mlp_ratio), gated)
    mlp = (3 if gated else 2) * d * h
    enc_layer = 2 * n_enc * (4 * d * d + mlp) + 4 * n_enc * n_enc * d
    dec_layer = (2 * n_dec * (4 * d * d + 2 * d * d + mlp)  # self qkv+proj, cross q+proj, mlp
                 + 2 * n_enc * 2 * d * d  # cross-attention keys/values of the context
                 + 4 * n_dec * n_dec * d + 4 * n_dec * n_enc * d)
    targets = [m for m in modalities if m.kind != "pixels"]
    vocab = sum(m.vocab_size for m in targets) / max(len(targets), 1)
    head = 2 * n_dec * d * vocab
    fwd = (int(model_cfg.encoder_depth) * enc_layer + int(model_cfg.decoder_depth) * dec_layer
           + head)
    return 3.0 * fwd * batch


@dataclasses.dataclass
class CompileReport:
    topology: str
    num_chips: int
    mesh: dict
    params: int
    argument_bytes: int  # per chip: state + batch shards
    output_bytes: int
    alias_bytes: int  # donated (reused) input buffers
    temp_bytes: int  # activations, gradients in flight, workspace
    flops: float  # per chip per step, XLA's cost analysis (loop bodies counted once)
    model_flops: float  # whole step, all chips, analytic (see model_flops_per_step)
    collectives: dict
    compile_s: float
    bytes_accessed: float = float("nan")  # per chip per step, XLA's cost analysis (as flops)

    @property
    def peak_bytes(self) -> int:
        # Donated outputs reuse argument buffers, so they are not counted twice.
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, hbm_bytes: int) -> bool:
        return self.peak_bytes <= hbm_bytes


def analyse(compiled, *, topology: str, num_chips: int, mesh: dict, params: int,
            compile_s: float, model_flops: float = float("nan")) -> CompileReport:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return CompileReport(
        topology=topology, num_chips=num_chips, mesh=mesh, params=params,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        flops=float((cost or {}).get("flops", float("nan"))), model_flops=float(model_flops),
        collectives=collective_counts(compiled.as_text()), compile_s=compile_s,
        bytes_accessed=float((cost or {}).get("bytes accessed", float("nan"))))


def format_report(r: CompileReport, hbm_bytes: int | None = None) -> str:
    gib = 1 << 30
    lines = [
        f"topology {r.topology}: {r.num_chips} chips, mesh {r.mesh}, {r.params / 1e6:.1f}M params",
        f"  memory per chip: {r.peak_bytes / gib:.2f} GiB (arguments {r.argument_bytes / gib:.2f}, "
        f"outputs {r.output_bytes / gib:.2f}, donated {r.alias_bytes / gib:.2f}, "
        f"temporaries {r.temp_bytes / gib:.2f})"
        + (f" of {hbm_bytes / gib:.0f} GiB HBM -> {'fits' if r.fits(hbm_bytes) else 'DOES NOT FIT'}"
           if hbm_bytes else ""),
        f"  FLOPs per step: model {r.model_flops:.3e} (analytic, fwd+bwd); XLA-counted "
        f"{r.flops * r.num_chips:.3e} (scanned layers counted once)",
        "  collectives: " + (", ".join(f"{k} x{v}" for k, v in sorted(r.collectives.items())) or "none"),
        f"  compile time: {r.compile_s:.1f} s",
    ]
    return "\n".join(lines + roofline_lines(r))


def roofline_lines(r: CompileReport) -> list[str]:
    """Roofline step time per chip. FLOPs: the larger of the analytic model count per chip and
    XLA's (which counts a scanned layer once); bytes: XLA's "bytes accessed" (also counted once
    per loop body, so the memory time is a lower bound)."""
    gen = parse_topology(r.topology).generation
    flops = max(x for x in (r.model_flops / max(r.num_chips, 1), r.flops) if x == x) \
        if r.model_flops == r.model_flops or r.flops == r.flops else float("nan")
    if not (flops == flops and r.bytes_accessed == r.bytes_accessed):
        return ["  roofline: no cost analysis from the compiler"]
    est = roofline.estimate(flops, r.bytes_accessed, gen)
    return [f"  XLA cost analysis per chip: {r.flops:.3e} FLOPs, {r.bytes_accessed:.3e} bytes "
            "accessed (loop bodies counted once)", "  " + roofline.format_line(est)]


def compile_for_topology(config, topology: str) -> CompileReport:
    """Lower and compile the trainer's real update step for `topology`; no data, no TPU needed.

    The step comes from the trainer's own plan (`fourm.train.plan.build_plan`): model, optimizer,
    state shardings from the logical-axis rules, batch shardings, donation. Vocabularies come from
    the registry (plus `config.model.vocab_overrides`), since there is no data manifest here.
    """
    topo = parse_topology(topology)
    plan = build_plan(config, None, devices=topology_devices(topo), process_count=1)
    t0 = time.perf_counter()
    compiled, _ = plan.compile_train_step()
    flops = model_flops_per_step(config.model, plan.modalities, plan.masking.input_budget,
                                 plan.masking.target_budget, config.batch_size)
    return analyse(compiled, topology=topology, num_chips=topo.num_chips, mesh=dict(plan.mesh.shape),
                   params=plan.num_params, compile_s=time.perf_counter() - t0, model_flops=flops)
