"""The reserved ids of a text vocabulary: one object that masking, generation, the text tokenizer
and the 4M compatibility code all read (each sequence modality carries one, `Modality.text`).

    0 [PAD]   1 [UNK]   2 [SOS]   3 [EOS]
    4 .. 4+n-1        span sentinels [S_0] .. [S_{n-1}]      (4M: [S_1] has id 5)
    then 4 groups of B value-bin tokens v0=0 .. v3=B-1       (fourm's SentencePiece layout)

fourm's text tokenizer reserves 100 sentinels; 4M's WordPiece vocabulary 200 (`ML4M`). Span
masking numbers its sentinels from [S_1]; `merge_spans` undoes it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

NUM_VALUE_GROUPS = 4  # v0..v3, as 4M (box corners; metadata field / value)
NUM_BYTES = 256  # byte-fallback pieces after the value bins (fourm's SentencePiece)
DEFAULT_NUM_SENTINELS = 100
DEFAULT_VALUE_BINS = 100  # 4M uses 1000 for 224 px; 100 is finer than a pixel at 64 px


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Fixed ids of the reserved tokens, computable without a trained model."""

    num_sentinels: int = DEFAULT_NUM_SENTINELS
    value_bins: int = DEFAULT_VALUE_BINS

    # Identical in fourm's and 4M's vocabularies.
    pad_id = 0
    unk_id = 1
    sos_id = 2
    eos_id = 3
    sentinel_base = 4  # [S_i] = sentinel_base + i

    def __post_init__(self):
        if self.num_sentinels < 1 or self.value_bins < 2:
            raise ValueError(f"need num_sentinels >= 1 and value_bins >= 2, got {self}")

    # ------------------------------------------------------------------ sentinels
    def sentinel(self, i):
        """Id of [S_i] (vectorised over arrays; no range check, see `sentinel_id`)."""
        return self.sentinel_base + i

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} outside [0, {self.num_sentinels})")
        return self.sentinel_base + int(i)

    def is_sentinel(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.sentinel_base) & (ids < self.sentinel_base + self.num_sentinels)

    @property
    def sentinel_ids(self) -> frozenset[int]:
        return frozenset(range(self.sentinel_base, self.sentinel_base + self.num_sentinels))

    def is_reserved(self, ids) -> np.ndarray:
        """Ids that must not occur in raw text: PAD, SOS, EOS (masking adds it) and sentinels."""
        ids = np.asarray(ids)
        return (ids == self.pad_id) | (ids == self.sos_id) | (ids == self.eos_id) | self.is_sentinel(ids)

    # ------------------------------------------------------------------ fourm's SentencePiece ids
    def value_id(self, group: int, bin_: int) -> int:
        if not 0 <= group < NUM_VALUE_GROUPS:
            raise ValueError(f"value group {group} outside [0, {NUM_VALUE_GROUPS})")
        if not 0 <= bin_ < self.value_bins:
            raise ValueError(f"value bin {bin_} outside [0, {self.value_bins}) for group v{group}")
        return self.sentinel_base + self.num_sentinels + int(group) * self.value_bins + int(bin_)

    @property
    def first_byte_id(self) -> int:
        return self.sentinel_base + self.num_sentinels + NUM_VALUE_GROUPS * self.value_bins

    @property
    def first_learned_id(self) -> int:
        return self.first_byte_id + NUM_BYTES

    def special_pieces(self) -> list[str]:
        """Sentinel and value pieces in id order (ids 4 .. first_byte_id - 1)."""
        return ([f"[S_{i}]" for i in range(self.num_sentinels)]
                + [f"v{g}={b}" for g in range(NUM_VALUE_GROUPS) for b in range(self.value_bins)])


FOURM = TextLayout()
ML4M = TextLayout(num_sentinels=200, value_bins=1000)  # 4M's WordPiece: [S_0] .. [S_199]


def split_by_sentinel(ids: Iterable[int], layout: TextLayout) -> dict[int | None, list[int]]:
    """Group a decoder sequence `[S_a] span_a [S_b] span_b ...` into {S_a: span_a, ...}; tokens
    before the first sentinel go under None."""
    spans: dict[int | None, list[int]] = {}
    current = None
    sentinels = layout.sentinel_ids
    for tok in ids:
        tok = int(tok)
        if tok in sentinels:
            current = tok
            spans.setdefault(current, [])
        else:
            spans.setdefault(current, []).append(tok)
    return spans


def merge_spans(input_ids: Sequence[int], target: Sequence[int], layout: TextLayout,
                drop_ids: Iterable[int] = ()) -> list[int]:
    """Replace each sentinel of `input_ids` with the span `target` holds after the same sentinel
    (a sentinel without a span becomes empty); the inverse of span masking. `drop_ids` (e.g. EOS,
    PAD) are removed from the spans. An empty input is one masked run, [S_1] (4M's input budget 0:
    the whole text is the first span)."""
    if len(input_ids) == 0:
        input_ids = [layout.sentinel(1)]
    drop = set(int(d) for d in drop_ids)
    spans = split_by_sentinel(target, layout)
    sentinels = layout.sentinel_ids
    out: list[int] = []
    for tok in input_ids:
        tok = int(tok)
        if tok in sentinels:
            out.extend(t for t in spans.get(tok, []) if t not in drop)
        else:
            out.append(tok)
    return out


def check_token_ids(ids: Sequence[int], vocab_size: int, source: str) -> list[int]:
    """`ids` as a list of ints, or a clear error: not 1-D, not integers, or outside [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 and not (arr.ndim == 0 and arr.size == 1):
        raise ValueError(f"decode takes a 1-D sequence of token ids, got shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"token id {int(arr[i])} at position {i} is outside the text vocabulary "
                         f"[0, {vocab_size}) of {source} ({bad.size} out-of-range ids in total)")
    return [int(x) for x in arr]
