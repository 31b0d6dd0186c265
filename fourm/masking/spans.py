"""T5-style span masking for sequences, in 4M's exact format.

4M appends `[EOS]` to the token ids, truncates to the modality's `max_length`, then masks whole
units (tokens for `span` masking, `v1=<field> v0=<bin>` chunks for `chunk` masking). Each run of
masked units becomes one sentinel in the input; the target lists the runs, each after its sentinel,
and ends with the next sentinel:

    tokens  a b c d e [EOS]     masked: b c, e [EOS]
    input   a [S_1] d [S_2]
    target  [S_1] b c [S_2] e [EOS] [S_3]

Sentinels are numbered from 1 (`[S_i] = sentinel_base + i`, so `[S_1]` = 5 with 4M's layout);
the ids come from the modality's `fourm.text_layout.TextLayout`, whose `merge_spans` inverts this.
In the decoder, target[i] is the teacher-forcing input that predicts target[i+1]: a target of T
tokens costs T - 1 decoder slots (ml-4m drops the last token from the decoder the same way).
"""

from __future__ import annotations

import numpy as np

from fourm.text_layout import TextLayout


def max_sentinels_needed(max_length: int) -> int:
    """Worst case over masks of a `max_length` sequence: alternate masked runs + the closing one."""
    return (max_length + 1) // 2 + 1


def units_from_flat(tokens: np.ndarray, chunk_start_range: tuple[int, int] | None) -> np.ndarray:
    """Chunk index of every token: a chunk starts at ids in [lo, hi) (e.g. the `v1=*` field tokens).

    Without a range every token is its own unit (plain span masking).
    """
    if chunk_start_range is None:
        return np.arange(len(tokens))
    lo, hi = chunk_start_range
    starts = (tokens >= lo) & (tokens < hi)
    if len(starts):
        starts[0] = True  # anything before the first field token forms a chunk of its own
    return np.cumsum(starts) - 1


def truncate_units(tokens: np.ndarray, unit: np.ndarray, eos_id: int, max_length: int):
    """Append EOS as its own unit and keep the whole units that fit in `max_length` (as 4M).

    For single-token units this is 4M's `(ids + [EOS])[:max_length]`: a text that fills the
    modality loses its EOS, exactly like the reference.
    """
    tokens = np.concatenate([tokens, np.array([eos_id], tokens.dtype)])
    unit = np.concatenate([unit, [unit[-1] + 1 if len(unit) else 0]])
    if len(tokens) > max_length:
        ends = np.flatnonzero(np.append(unit[1:] != unit[:-1], True))  # last token of each unit
        n_units = int(np.searchsorted(ends + 1, max_length, side="right"))
        keep = ends[n_units - 1] + 1 if n_units else 0
        tokens, unit = tokens[:keep], unit[:keep]
    return tokens, unit


def keep_prob(scheme: str, rng: np.random.Generator) -> float:
    if scheme == "random":
        return float(rng.random())
    if scheme == "all":
        return 1.0
    if scheme == "binary":
        return float(rng.integers(2))
    raise ValueError(f"unknown keep scheme {scheme!r}")


def _input_length(kept_units: np.ndarray, unit_len: np.ndarray) -> np.ndarray:
    """Masked-input length for each row of a [n_options, U] kept-unit matrix."""
    masked = ~kept_units
    prev = np.zeros_like(masked)
    prev[:, 1:] = masked[:, :-1]
    return kept_units @ unit_len + (masked & ~prev).sum(-1)


def choose_kept_units(unit_len: np.ndarray, input_budget: int, p_keep: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Boolean [U]: which units stay in the input.

    Each unit is kept with probability `p_keep`; while the masked input would exceed the budget,
    4M lowers the keep probability and redraws. We draw one uniform per unit and lower the
    threshold over that draw instead: kept sets shrink monotonically, and removing a kept unit never
    lengthens the input (a run of masked units costs one sentinel), so the largest kept set that
    fits is found in one vectorised pass, with no rejection loop.
    """
    n_units = len(unit_len)
    if input_budget <= 0 or n_units == 0:
        return np.zeros(n_units, bool)
    u = rng.random(n_units)
    order = np.argsort(u, kind="stable")
    rank = np.empty(n_units, np.int64)
    rank[order] = np.arange(n_units)
    n0 = int((u <= p_keep).sum())
    kept = rank < n0
    if _input_length(kept[None], unit_len)[0] <= input_budget:
        return kept
    options = rank[None, :] < np.arange(n0 + 1)[:, None]  # row n keeps the n lowest draws
    lengths = _input_length(options, unit_len)
    n = int(np.flatnonzero(lengths <= input_budget)[-1])  # row 0 (one sentinel) always fits
    return options[n]


def span_mask(tokens: np.ndarray, unit: np.ndarray, kept_units: np.ndarray, layout: TextLayout,
              empty_input: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, full target ids) for the given kept units; vectorised (no per-token loop).

    `empty_input`: 4M's input budget 0 case: no encoder tokens at all (not even a sentinel).
    """
    masked = ~kept_units[unit]
    starts = masked & ~np.concatenate([[False], masked[:-1]])
    run = np.cumsum(starts)
    sentinels = layout.sentinel(run).astype(np.int32)
    n_runs = int(run[-1]) if len(run) else 0
    if empty_input:
        inp = np.zeros(0, np.int32)
    else:
        inp = np.where(masked, sentinels, tokens)[~masked | starts].astype(np.int32)
    # Target: interleave (sentinel if a run starts here, token if masked) and read the chosen slots.
    pairs = np.stack([sentinels, tokens.astype(np.int32)], axis=1).ravel()
    chosen = np.stack([starts, masked], axis=1).ravel()
    tgt = np.concatenate([pairs[chosen], np.array([layout.sentinel(n_runs + 1)], np.int32)])
    return inp, tgt


def crop_target(target: np.ndarray, slots: int, layout: TextLayout,
                rng: np.random.Generator) -> np.ndarray:
    """Cut a target to at most `slots` decoder slots (`slots + 1` tokens), starting at a sentinel.

    4M's rule: pick a random sentinel (not the closing one when there are several); if the target
    from there is long enough, take exactly the budget; otherwise take the suffix from the earliest
    sentinel that fits (shorter than the budget: the leftover goes to other modalities).
    """
    if slots <= 0:
        return target[:0]
    if len(target) - 1 <= slots:
        return target
    length = slots + 1
    sent = np.flatnonzero(layout.is_sentinel(target))
    start = int(sent[rng.integers(max(1, len(sent) - 1))])
    if len(target) - start >= length:
        return target[start:start + length]
    first_fit = int(sent[np.argmax(len(target) - sent <= length)])  # the closing sentinel always fits
    return target[first_fit:]
