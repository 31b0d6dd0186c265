"""Decoding schedules: how many tokens each step commits, and per-step temperature / guidance.

Schedules are small host-side NumPy arrays computed once per target; the jitted samplers take
them as data (their length, the number of steps, is the only static part), so changing a
temperature or a guidance weight never recompiles.

Token schedules follow 4M's definitions, so that the same settings decode the same numbers of
tokens per step as the reference (MaskGIT cosine, 8 steps over 196 tokens: 7 21 32 38 38 32 21 7).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TOKEN_SCHEDULES = ("cosine", "linear", "constant")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine", "onex:<min_t>:<power>")


def _check_steps(num_steps: int, total_tokens: int, what: str) -> None:
    if int(total_tokens) < 1:
        raise ValueError(f"{what}: nothing to decode (total_tokens={total_tokens})")
    if int(num_steps) < 1:
        raise ValueError(f"{what}: num_steps must be >= 1, got {num_steps}")
    if int(num_steps) > int(total_tokens):
        raise ValueError(f"{what}: {num_steps} steps for only {total_tokens} tokens to decode; "
                         f"use at most {total_tokens} steps")


def cosine_schedule(num_steps: int, total_tokens: int) -> np.ndarray:
    """Tokens per step from the cosine masking ratio cos(pi/2 * t): few tokens first and last.

    Step i commits round(total * (r_i - r_{i+1})) with r_i = (1 + cos(pi i / S)) / 2; the last step
    takes the remainder (4M's definition). Steps that would commit zero tokens are not allowed:
    with S <= total every step gets at least one because the remainder is spread below.
    """
    _check_steps(num_steps, total_tokens, "cosine schedule")
    ratio = [0.5 * (1.0 + math.cos(math.pi * i / num_steps)) for i in range(num_steps)]
    # Python's round (half to even) on purpose: it is what the reference uses.
    counts = [round(total_tokens * (a - b)) for a, b in zip(ratio[:-1], ratio[1:])]
    counts.append(total_tokens - sum(counts))
    return _no_empty_steps(np.asarray(counts, np.int64))


def linear_schedule(num_steps: int, total_tokens: int) -> np.ndarray:
    """Equal shares, the larger shares first (4M's definition; also ROAR's schedule)."""
    _check_steps(num_steps, total_tokens, "linear schedule")
    edges = np.linspace(0, total_tokens, num_steps + 1, dtype=int)
    counts = np.sort(np.diff(edges))[::-1]
    return np.ascontiguousarray(counts, dtype=np.int64)


def constant_schedule(tokens_per_step: int, total_tokens: int) -> np.ndarray:
    """`tokens_per_step` tokens each step; the last step takes what is left."""
    if int(tokens_per_step) < 1:
        raise ValueError(f"constant schedule: tokens_per_step must be >= 1, got {tokens_per_step}")
    num_steps = max(1, math.ceil(total_tokens / tokens_per_step))
    _check_steps(num_steps, total_tokens, "constant schedule")
    counts = np.full(num_steps, tokens_per_step, np.int64)
    counts[-1] = total_tokens - tokens_per_step * (num_steps - 1)
    return counts


def _no_empty_steps(counts: np.ndarray) -> np.ndarray:
    # Rounding can leave a zero (or, for tiny totals, a negative remainder); move single tokens
    # from the largest steps so every step decodes something and the sum is unchanged.
    counts = counts.copy()
    while (counts < 1).any():
        lo, hi = int(np.argmin(counts)), int(np.argmax(counts))
        counts[lo] += 1
        counts[hi] -= 1
    return counts


def token_schedule(name: str, num_steps: int, total_tokens: int) -> np.ndarray:
    """Tokens per step for schedule `name` (cosine | linear | constant; for constant, `num_steps`
    is the number of tokens per step)."""
    if name == "cosine":
        return cosine_schedule(num_steps, total_tokens)
    if name == "linear":
        return linear_schedule(num_steps, total_tokens)
    if name == "constant":
        return constant_schedule(num_steps, total_tokens)
    raise ValueError(f"unknown token schedule {name!r}; expected one of {TOKEN_SCHEDULES}")


def temperature_schedule(name: str, temperature: float, counts: Sequence[int]) -> np.ndarray:
    """Per-step temperatures for a token schedule `counts`, starting at `temperature`.

    constant: the same every step. linear: decays with the fraction of tokens still to decode
    (4M's linear schedule). cosine: temperature * cos(pi/2 * fraction decoded before the step).
    onex:<min_t>:<power>: 4M's 1/x^power decay from `temperature` to `min_t`.
    A temperature of 0 means greedy (argmax) for that step.
    """
    counts = np.asarray(counts, np.float64)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    done_before = np.concatenate([[0.0], np.cumsum(counts)[:-1]]) / counts.sum()
    if name == "constant":
        temps = np.full(len(counts), temperature)
    elif name == "linear":
        temps = temperature * (1.0 - done_before)
    elif name == "cosine":
        temps = temperature * np.cos(0.5 * np.pi * done_before)
    elif name.startswith("onex"):
        try:
            _, min_t, power = name.split(":")
            min_t, power = float(min_t), float(power)
        except ValueError:
            raise ValueError(f"temperature schedule {name!r} must look like onex:<min_t>:<power>") from None
        temps = _onex(temperature, min_t, power, counts)
    else:
        raise ValueError(f"unknown temperature schedule {name!r}; expected one of {TEMPERATURE_SCHEDULES}")
    if temperature > 0:
        # Never reach exactly 0 by decay: 0 switches a step to greedy, which only an explicit
        # temperature of 0 should do.
        temps = np.maximum(temps, 1e-9)
    return temps.astype(np.float32)


def _onex(max_t: float, min_t: float, power: float, counts: np.ndarray) -> np.ndarray:
    # A 1/x^power curve over the tokens, normalised to [0, 1], read at each step's cumulative
    # fraction and scaled into [min_t, max_t] (the shape of 4M's "onex" schedule).
    total = int(counts.sum())
    y = 1.0 / np.linspace(1.0, 100.0, num=total) ** power
    y = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    frac = np.cumsum(counts) / total
    return np.array([min_t + (max_t - min_t) * (1.0 - f) * y[i] for i, f in enumerate(frac)])


def guidance_schedule(weights: float | Sequence[float], num_steps: int, name: str = "constant"
                      ) -> np.ndarray:
    """Per-step guidance weights [num_steps, K] (K = number of guided conditions).

    constant: the same weights every step. cosine: from the given weights down to 1 (no
    guidance) along a half cosine, i.e. strong guidance while the layout forms, little at the end.
    """
    w = np.atleast_1d(np.asarray(weights, np.float32))
    if w.ndim != 1:
        raise ValueError(f"guidance weights must be a number or a list, got shape {w.shape}")
    if name == "constant":
        return np.tile(w[None], (num_steps, 1))
    if name == "cosine":
        t = np.arange(num_steps) / max(num_steps - 1, 1)
        f = 0.5 * (1.0 + np.cos(np.pi * t))[:, None]
        return (1.0 + (w[None] - 1.0) * f).astype(np.float32)
    raise ValueError(f"unknown guidance schedule {name!r}; expected 'constant' or 'cosine'")


def per_sample_counts(schedule_name: str, num_steps: int, num_unknown: Sequence[int]) -> np.ndarray:
    """Token schedule per sample [B, S] when samples have different numbers of unknown tokens
    (partly given targets). All rows share the number of steps S (static for the sampler)."""
    rows = [token_schedule(schedule_name, num_steps, int(n)) for n in num_unknown]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"schedule {schedule_name!r} gives different step counts per sample "
                         f"({sorted(lengths)}) for unknown-token counts {list(num_unknown)}")
    return np.stack(rows)
