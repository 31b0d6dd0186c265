"""What generation, pre-tokenization and export need from a tokenizer, whoever wrote it (fourm's
VQ-VAEs and SentencePiece model, 4M's released tokenizers, a user's own).

A tokenizer says which kind of modality it serves with a class attribute `kind`, the
`Modality.kind` it produces tokens for: "grid" (image-like token grids) or "sequence" (text).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from fourm.text_layout import TextLayout

KINDS = ("grid", "sequence")


class ImageTokenizerLike(Protocol):
    kind: ClassVar[str]  # "grid"
    name: str
    grid: tuple[int, int]
    vocab_size: int

    def encode(self, x: Any) -> np.ndarray: ...  # native batch -> int token ids [B, gh, gw]

    def decode(self, tokens: Any) -> np.ndarray: ...  # token ids -> native batch


class TextTokenizerLike(Protocol):
    kind: ClassVar[str]  # "sequence"
    vocab_size: int
    layout: TextLayout  # its reserved ids; must equal the sequence modality's `Modality.text`

    def encode(self, text: str, *, allow_empty: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def tokenizer_kind(tok: Any) -> str:
    """"grid" or "sequence"; a clear error for an object that is not a tokenizer."""
    kind = getattr(type(tok), "kind", None)
    if kind not in KINDS:
        raise TypeError(f"{type(tok).__name__} is not a fourm tokenizer: it needs a class attribute "
                        f"kind = 'grid' or 'sequence' (see fourm.tokenizer_protocol), got {kind!r}")
    return kind
