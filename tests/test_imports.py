"""fourm's import graph, read statically (ast): no cycles, and each package imports only the
layers below it (docs/architecture.md). Imports inside functions count too: a lazy import may
keep start-up fast, never hide a cycle or a layer break."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each part of fourm may import (besides itself). Keep in step with docs/architecture.md.
FOUNDATION = {"io", "text_layout", "tokenizer_protocol", "modalities", "batch", "config", "hostmem",
              "runtime"}
LAYERS: dict[str, set[str]] = {
    "io": set(), "text_layout": set(), "batch": set(), "hostmem": set(), "runtime": set(),
    "config": {"modalities", "text_layout"},
    "modalities": {"text_layout"}, "tokenizer_protocol": {"text_layout"},
    "report": FOUNDATION,
    "data": FOUNDATION,
    "masking": FOUNDATION,
    "model": FOUNDATION,
    "tokenizers": FOUNDATION | {"data"},
    "quality": FOUNDATION | {"data"},
    "generate": FOUNDATION | {"data", "masking", "model", "quality"},
    "train": FOUNDATION | {"data", "masking", "model", "tokenizers", "compat"},
    "compat": FOUNDATION | {"data", "masking", "model", "generate", "tokenizers", "quality"},
    "backbone": FOUNDATION | {"data", "masking", "model", "tokenizers", "generate", "train", "compat",
                              "quality"},
    "features": FOUNDATION | {"data", "masking", "model", "tokenizers", "generate", "train", "compat",
                              "quality", "backbone"},
    "bench": FOUNDATION | {"data", "masking", "model", "tokenizers", "generate", "train", "compat",
                           "backbone", "quality", "features"},
    "quickstart": FOUNDATION | {"report", "data", "masking", "model", "tokenizers", "generate", "train",
                                "compat", "backbone", "quality", "features"},
    "cli": FOUNDATION | {"report", "data", "masking", "model", "tokenizers", "generate", "train", "compat",
                         "bench", "quickstart", "backbone", "quality", "features"},
}
# A known break, to remove: the tokenizer export dispatching to 4M's tokenizers in compat (a shared
# artifact protocol would turn it round).
ALLOWED_FOR_NOW = {("tokenizers", "compat")}
# Scripts that run in another interpreter, where `fourm` is apple/ml-4m's package, not ours
# (tests/test_bench_reference.py checks that they import neither the project nor jax).
FOREIGN = {"fourm.bench.ml4m_reference_worker"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "fourm").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """fourm modules `name` imports anywhere in its source (`from pkg import mod` counts as mod)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import fourm.a.b.c` where c is a name: the module a.b
                t = t.rpartition(".")[0]
            if t.startswith("fourm") and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, mods) for n, p in mods.items() if n not in FOREIGN}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fourm"


def test_the_graph_is_read(graph):
    # The walk sees top-level, relative and in-function imports (guards against a vacuous pass).
    assert "fourm.model.layers" in graph["fourm.model.fourm_model"]
    assert "fourm.generate.chain" in graph["fourm.bench.generate"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_packages_import_only_lower_layers(graph):
    assert set(LAYERS) >= {_part(m) for m in graph} - {"fourm"}, "a new part of fourm needs a layer"
    broken = sorted({(m, t) for m, targets in graph.items() for t in targets
                     if _part(t) != _part(m) and _part(m) in LAYERS
                     and _part(t) not in LAYERS[_part(m)] and (_part(m), _part(t)) not in ALLOWED_FOR_NOW})
    assert broken == [], "imports across layers (see docs/architecture.md): " + ", ".join(
        f"{m} -> {t}" for m, t in broken)
