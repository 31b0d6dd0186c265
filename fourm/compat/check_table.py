"""The parts of `fourm-ml4m check` that every check section shares: its error, its table row
and the context a section gets (`fourm.compat.ml4m_check` runs the sections)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fourm.model.spec import ModelSpec

FLOAT_TOL = 1e-4


class FixtureError(ValueError):
    """A fixture / ml-4m batch that cannot be converted (names the array and the problem)."""


@dataclasses.dataclass
class Row:
    section: str
    name: str
    kind: str  # float | int | bool | argmax | skip
    shape: tuple
    value: str  # max abs diff, or mismatch count
    ok: bool | None  # None = not checked (skipped)
    note: str = ""


@dataclasses.dataclass
class CheckContext:
    fixture: Path
    model: Any
    spec: ModelSpec
    tol: float = FLOAT_TOL
    compiler_options: dict | None = None  # XLA options for the jitted comparisons (tests: fast compile)
    extras: dict = dataclasses.field(default_factory=dict)
