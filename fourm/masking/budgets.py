"""Token budgets: a mixture of Dirichlet distributions splits a fixed budget across modalities.

A mixture component holds, per modality, an input alpha, a target alpha and a keep scheme for
sequences. Alpha 0 means "never" for that modality in that component (4M's `rgb2all`: inputs only
from RGB). Per sample we pick a component by weight, draw Dirichlet proportions over the
modalities with a positive alpha, and turn them into integer counts that sum exactly to the budget,
clipped to what each modality can hold; what a clipped modality cannot take goes to the others of
the same component (`allocate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from fourm.modalities import Modality

KEEP_SCHEMES = ("random", "all", "binary")
PRESETS = ("all2all", "rgb2all", "caption2all")  # any "<modality>2all" works


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
    """One Dirichlet component; the tuples follow the transform's modality order."""

    weight: float
    input_alphas: tuple[float, ...]
    target_alphas: tuple[float, ...]
    keep: tuple[str, ...]  # sequences only: how the kept fraction is drawn (see spans.keep_prob)
    name: str = ""


def input_capable(m: Modality, input_only: Sequence[str], target_only: Sequence[str]) -> bool:
    return m.name not in target_only


def target_capable(m: Modality, input_only: Sequence[str], target_only: Sequence[str]) -> bool:
    # Raw pixels have no vocabulary to predict: they are encoder inputs only (as 4M's rgb@224).
    return m.kind != "pixels" and m.name not in input_only


def preset_component(name: str, modalities: Sequence[Modality], alpha: float, keep: str,
                     input_only: Sequence[str] = (), target_only: Sequence[str] = (),
                     weight: float = 1.0) -> MixtureComponent:
    """`all2all`: every capable modality gets `alpha` on both sides.
    `<X>2all` (4M's `rgb2all`, and e.g. `caption2all`): the whole input budget from one modality,
    targets from every other target-capable modality with `alpha`. X is a modality name
    (`caption`, `tok_rgb@64`) or a source (`rgb`: its pixel modality if there is one, else its
    token grid)."""
    if name == "all2all":
        inp = tuple(alpha if input_capable(m, input_only, target_only) else 0.0 for m in modalities)
        tgt = tuple(alpha if target_capable(m, input_only, target_only) else 0.0 for m in modalities)
        return MixtureComponent(float(weight), inp, tgt, (keep,) * len(modalities), name)
    if not name.endswith("2all") or len(name) == len("2all"):
        raise ValueError(f"unknown mixture preset {name!r}; known: {PRESETS} or <modality>2all "
                         f"(or give per-modality alphas)")
    src = name[:-len("2all")]
    named = [m for m in modalities if m.name == src]
    by_source = sorted((m for m in modalities if m.source == src), key=lambda m: m.kind != "pixels")
    cands = [m for m in (named or by_source) if input_capable(m, input_only, target_only)]
    if not cands:
        raise ValueError(f"mixture preset {name!r} needs an input modality named or sourced {src!r}; "
                         f"got {[m.name for m in modalities]}")
    source = cands[0]
    # One positive alpha = the whole input budget goes to it (4M writes 1000 for the same effect);
    # the source is never its own target, so the task is always "from all of X", as generation
    # conditions on it: a sequence source keeps every token (`all`) instead of a random part.
    inp = tuple(1.0 if m is source else 0.0 for m in modalities)
    tgt = tuple(alpha if target_capable(m, input_only, target_only) and m is not source else 0.0
                for m in modalities)
    keeps = tuple("all" if m is source and m.kind == "sequence" else keep for m in modalities)
    return MixtureComponent(float(weight), inp, tgt, keeps, name)


def mixture_from_alphas(spec: Mapping, modalities: Sequence[Modality],
                        weights: Sequence[float] | None = None) -> list[MixtureComponent]:
    """Components from 4M's per-modality layout:
    `{mod: {"input_alphas": [...], "target_alphas": [...], "keep": [...]}}` (one entry per component)."""
    names = [m.name for m in modalities]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"masking alphas name modalities {unknown} that are not configured {names}")
    missing = [n for n in names if n not in spec]
    if missing:
        raise ValueError(f"masking alphas lack modalities {missing} (every configured modality needs "
                         f"input_alphas and target_alphas; use 0 for 'never')")
    sizes = {}
    for n in names:
        for field in ("input_alphas", "target_alphas"):
            if field not in spec[n]:
                raise ValueError(f"masking alphas for {n!r} lack {field!r}")
            sizes[(n, field)] = len(spec[n][field])
    k = sizes[(names[0], "input_alphas")]
    bad = {key: v for key, v in sizes.items() if v != k}
    if bad:
        raise ValueError(f"every alpha list must have one entry per mixture component ({k}); got {bad}")
    weights = [1.0] * k if not weights else [float(w) for w in weights]
    if len(weights) != k:
        raise ValueError(f"masking weights has {len(weights)} entries for {k} mixture components")
    comps = []
    for c in range(k):
        keep = tuple(str(spec[n].get("keep", ["random"] * k)[c]) for n in names)
        comps.append(MixtureComponent(weights[c], tuple(float(spec[n]["input_alphas"][c]) for n in names),
                                      tuple(float(spec[n]["target_alphas"][c]) for n in names), keep,
                                      f"component{c}"))
    return comps


def validate_mixture(comps: Sequence[MixtureComponent], modalities: Sequence[Modality],
                     input_only: Sequence[str], target_only: Sequence[str]) -> np.ndarray:
    """Check alphas against roles; returns the normalised component weights."""
    if not comps:
        raise ValueError("the masking mixture has no components")
    n = len(modalities)
    for c in comps:
        label = c.name or "component"
        if not (len(c.input_alphas) == len(c.target_alphas) == len(c.keep) == n):
            raise ValueError(f"mixture {label}: alphas/keep need {n} entries (one per modality)")
        for m, a_in, a_t, keep in zip(modalities, c.input_alphas, c.target_alphas, c.keep):
            if not (np.isfinite(a_in) and np.isfinite(a_t)) or a_in < 0 or a_t < 0:
                raise ValueError(f"mixture {label}: alphas of {m.name!r} must be finite and >= 0, "
                                 f"got input {a_in}, target {a_t}")
            if a_t > 0 and not target_capable(m, input_only, target_only):
                raise ValueError(f"mixture {label}: {m.name!r} ({m.kind}) cannot be a target "
                                 f"(pixel modalities and input_only modalities), but its target alpha is {a_t}")
            if a_in > 0 and not input_capable(m, input_only, target_only):
                raise ValueError(f"mixture {label}: {m.name!r} is target_only but its input alpha is {a_in}")
            if keep not in KEEP_SCHEMES:
                raise ValueError(f"mixture {label}: keep scheme {keep!r} of {m.name!r} not in {KEEP_SCHEMES}")
    w = np.array([c.weight for c in comps], np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


def draw_proportions(alphas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet proportions over the modalities with alpha > 0 (exact zeros elsewhere)."""
    p = np.zeros(len(alphas))
    pos = np.flatnonzero(alphas > 0)
    if len(pos) == 1:
        p[pos] = 1.0
    elif len(pos) > 1:
        # Small alphas (<~0.05) can underflow a coordinate to exactly 0. Keep it a hair above 0:
        # the modality stays eligible for slots the others cannot hold (see `allocate`).
        p[pos] = np.maximum(rng.dirichlet(alphas[pos]), np.finfo(np.float64).tiny)
        if not np.isfinite(p).all():
            p[:] = 0.0
            p[pos] = 1.0 / len(pos)
    return p


def allocate(budget: int, p: np.ndarray, cap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts ~ budget * p, each <= cap, summing to min(budget, sum of cap where p > 0).

    Floors first, then the remainder by a multinomial draw on p (so the expected count is p *
    budget); whatever a modality cannot hold goes back to the ones with room, in proportion to p.
    Each round either finishes or fills one modality, so at most len(p) + 1 rounds run.
    """
    counts = np.zeros(len(p), np.int64)
    cap = np.asarray(cap, np.int64)
    active = (p > 0) & (cap > 0)
    remaining = int(budget)
    while remaining > 0 and active.any():
        w = np.where(active, p, 0.0)
        s = w.sum()
        w = w / s if s > 0 else active / active.sum()
        share = w * remaining
        add = np.floor(share).astype(np.int64)
        rest = remaining - int(add.sum())
        if rest > 0:
            add += rng.multinomial(rest, w)
        add = np.minimum(add, cap - counts)
        counts += add
        remaining = int(budget) - int(counts.sum())
        active &= counts < cap
    return counts


def static_capacity(alphas: Sequence[float], caps: Sequence[int]) -> int:
    return int(sum(c for a, c in zip(alphas, caps) if a > 0))
