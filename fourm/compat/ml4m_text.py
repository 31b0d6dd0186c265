"""4M's WordPiece text tokenizer, and the text forms 4M-21 gives boxes, colour palettes and metadata.

    tok = ML4MTextTokenizer.load("text_tokenizer_4m_wordpiece_30k.json")   # or its folder
    tok.encode("a dog [S_1]")             # ids exactly as ml-4m's tok.encode(text).ids
    tok.decode(ids)                       # as ml-4m's tok.decode(ids, skip_special_tokens=False)
    boxes_to_text([(0.1, 0.2, 0.3, 0.4, "dog")])      # "v0=100 v1=200 v2=300 v3=400 dog"

The tokenizer is the HF `tokenizers` model the JSON file defines (normaliser, pre-tokenizer,
WordPiece, added tokens); nothing here re-implements it. What this module adds is 4M's id
layout, which its models rely on: [PAD]=0 [UNK]=1 [SOS]=2 [EOS]=3, sentinels [S_0].. from id 4,
then the coordinate/value tokens v0=0 .. v3=<bins-1> (fourm's `TextLayout` with 200 sentinels and
1000 bins; checked against the file on load), then COCO class names as single added tokens.

The object has the interface of fourm's own `TextTokenizer` (encode / decode / vocab_size /
pad_id / eos_id / sentinel_id / value_id / layout), so `fourm.generate` encodes text conditions and
decodes captions of an official 4M model through it. Unlike fourm's SentencePiece model it is
lossy, as 4M's is: text is lower-cased, accents stripped, whitespace collapsed, unknown words
become [UNK]; `decode` keeps [PAD] and joins word pieces the way 4M shows them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from fourm.text_layout import ML4M, check_token_ids
from fourm.tokenizers.text import EOS, NUM_VALUE_GROUPS, PAD, SOS, UNK, TextLayout

VERSION = "ml4m.wordpiece/1"
FILE_GLOB = "text_tokenizer*.json"  # ml-4m: fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json
SPECIALS = {PAD: 0, UNK: 1, SOS: 2, EOS: 3}
# The layout of the released WordPiece file (and of every released 4M model's text modalities).
ML4M_TEXT_LAYOUT = ML4M  # the layout the ml4m modalities carry (fourm.text_layout)


class ML4MTextTokenizer:
    """4M's WordPiece tokenizer (a `tokenizers.Tokenizer`) with fourm's text-tokenizer interface."""

    kind = "sequence"  # fourm.tokenizer_protocol

    def __init__(self, tokenizer: Tokenizer, raw: bytes, source: str = "<memory>"):
        self._tok = tokenizer
        self._source = source
        self._hash = hashlib.sha256(raw).hexdigest()
        self.layout = _infer_layout(tokenizer, source)
        self._vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ML4MTextTokenizer":
        """From the JSON file, or a folder holding exactly one `text_tokenizer*.json`."""
        p = Path(path)
        if p.is_dir():
            p = find_tokenizer_file(p)
            if p is None:
                raise FileNotFoundError(f"{path}: no {FILE_GLOB} in this folder (4M's WordPiece "
                                        "tokenizer is text_tokenizer_4m_wordpiece_30k.json)")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file (4M's WordPiece tokenizer JSON)")
        raw = p.read_bytes()
        try:
            json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not a JSON file ({e}); expected a tokenizers JSON") from None
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{p}: not a tokenizers JSON the library can read ({e})") from None
        return cls(tok, raw, source=str(p))

    # ----------------------------------------------------------------------------- properties
    vocab_size = property(lambda self: self._vocab)
    pad_id = property(lambda self: SPECIALS[PAD])
    unk_id = property(lambda self: SPECIALS[UNK])
    sos_id = property(lambda self: SPECIALS[SOS])
    eos_id = property(lambda self: SPECIALS[EOS])
    num_sentinels = property(lambda self: self.layout.num_sentinels)
    value_bins = property(lambda self: self.layout.value_bins)
    sha256 = property(lambda self: self._hash)
    config_hash = property(lambda self: self._hash[:16])
    version = property(lambda self: VERSION)
    tokenizer = property(lambda self: self._tok)  # the underlying tokenizers.Tokenizer

    def sentinel_id(self, i: int) -> int:
        return self.layout.sentinel_id(i)

    def value_id(self, group: int, bin_: int) -> int:
        return self.layout.value_id(group, bin_)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(self._check_ids([i])[0])

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return (f"ML4MTextTokenizer(vocab_size={self.vocab_size}, sentinels={self.num_sentinels}, "
                f"value_bins={self.value_bins}, sha256={self.config_hash}, source={self._source})")

    # ----------------------------------------------------------------------------- encode / decode
    def _encoding(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"text tokenizer encodes str, got {type(text).__name__}: {text!r:.80}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text has a character that is not valid Unicode text "
                             f"({text[e.start]!r} at position {e.start}); text starts {text[:40]!r}") from None
        return self._tok.encode(text)  # as ml-4m: the file has no post-processor, so no [SOS]/[EOS]

    def encode(self, text: str, *, allow_empty: bool = False) -> list[int]:
        """Token ids of `text` (no [SOS]/[EOS] added). Text that gives no token (empty, only
        whitespace) is an error unless allow_empty."""
        ids = list(self._encoding(text).ids)
        if not ids and not allow_empty:
            raise ValueError(f"text {text!r:.40} gives no tokens (pass allow_empty=True where an "
                             "empty sequence is meaningful)")
        return ids

    def encode_array(self, text: str, *, allow_empty: bool = False) -> np.ndarray:
        return np.asarray(self.encode(text, allow_empty=allow_empty), np.int32)

    def tokens(self, text: str) -> list[str]:
        """The token strings of `text` (ml-4m: tok.encode(text).tokens)."""
        return list(self._encoding(text).tokens)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        return check_token_ids(ids, self.vocab_size, self._source)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as 4M shows it (tok.decode(ids, skip_special_tokens=False)); with
        skip_special_tokens=True every added token (sentinels, values, class names) is dropped."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def class_names(self) -> list[str]:
        """The detection classes that are single added tokens (COCO's in the released file)."""
        first = self.layout.value_id(NUM_VALUE_GROUPS - 1, self.value_bins - 1) + 1
        added = self._tok.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added) if i >= first]


def find_tokenizer_file(folder: str | os.PathLike) -> Path | None:
    """The one `text_tokenizer*.json` in `folder` (None if there is none; error if several)."""
    found = sorted(Path(folder).glob(FILE_GLOB))
    if len(found) > 1:
        raise ValueError(f"{folder}: several text tokenizer files {[f.name for f in found]}; keep one")
    return found[0] if found else None


def load(path: str | os.PathLike) -> ML4MTextTokenizer:
    return ML4MTextTokenizer.load(path)


def _infer_layout(tok: Tokenizer, source: str) -> TextLayout:
    """TextLayout of the file: count [S_i] and v0=i tokens, then check every reserved id."""
    vocab = tok.get_vocab(with_added_tokens=True)
    for piece, i in SPECIALS.items():
        if vocab.get(piece) != i:
            raise ValueError(f"text tokenizer {source}: {piece} has id {vocab.get(piece)}, 4M's "
                             f"layout needs {i}")
    n = 0
    while f"[S_{n}]" in vocab:
        n += 1
    bins = 0
    while f"v0={bins}" in vocab:
        bins += 1
    if n < 1 or bins < 2:
        raise ValueError(f"text tokenizer {source}: found {n} sentinels [S_i] and {bins} value "
                         "tokens v0=i; 4M's layout has sentinels from id 4 and v0=..v3= tokens")
    layout = TextLayout(num_sentinels=n, value_bins=bins)
    want = {f"[S_{i}]": layout.sentinel_id(i) for i in range(n)}
    want.update({f"v{g}={b}": layout.value_id(g, b) for g in range(NUM_VALUE_GROUPS) for b in range(bins)})
    for piece, i in want.items():
        if vocab.get(piece) != i:
            raise ValueError(f"text tokenizer {source}: {piece} has id {vocab.get(piece)}, 4M's "
                             f"layout ({n} sentinels from id 4, then v0..v3 x {bins}) needs {i}")
    return layout


# ---------------------------------------------------------------------------------------------
# 4M-21's text forms. Values become v-tokens; the strings are what 4M-21's transforms write.
# ---------------------------------------------------------------------------------------------
def _bin(v: float, bins: int, what: str) -> int:
    if not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{what}: coordinate {v!r} outside [0, 1] (boxes are normalised to the image)")
    return round(float(v) * (bins - 1))  # Python's round (half to even), as 4M


def boxes_to_text(boxes: Iterable[Sequence[Any]], bins: int = ML4M_TEXT_LAYOUT.value_bins) -> str:
    """Boxes (x0, y0, x1, y1, class[, score]) in [0, 1] -> "v0=.. v1=.. v2=.. v3=.. class ...",
    in the given order (4M-21's DetectionTransform.convert_bboxes_to_string; ordering and the
    score threshold are the caller's, see `order_boxes`)."""
    words = []
    for k, box in enumerate(boxes):
        if len(box) not in (5, 6):
            raise ValueError(f"box {k}: expected (x0, y0, x1, y1, class[, score]), got {box!r}")
        words += [f"v{g}={_bin(v, bins, f'box {k}')}" for g, v in enumerate(box[:4])] + [str(box[4])]
    return " ".join(words)


def order_boxes(boxes: Iterable[Sequence[Any]], order: str = "dist_to_orig") -> list:
    """4M-21's box orders: dist_to_orig (its default: by x0^2 + y0^2), area (largest first) or
    score (highest first)."""
    keys = {"dist_to_orig": (lambda b: b[0] ** 2 + b[1] ** 2, False),
            "area": (lambda b: (b[2] - b[0]) * (b[3] - b[1]), True),
            "score": (lambda b: b[5], True)}
    if order not in keys:
        raise ValueError(f"box order {order!r}; known: {sorted(keys)}")
    key, reverse = keys[order]
    return sorted(boxes, key=key, reverse=reverse)


_VALUE_RE = re.compile(r"^v([0-3])=(0|[1-9]\d*)$")


def _value(word: str) -> tuple[int, int] | None:
    m = _VALUE_RE.match(word)
    return (int(m.group(1)), int(m.group(2))) if m else None


def text_to_boxes(text: str, bins: int = ML4M_TEXT_LAYOUT.value_bins
                  ) -> list[tuple[float, float, float, float, str]]:
    """Decoded detection text -> boxes (x0, y0, x1, y1, class) in [0, 1]. Generated text may be
    malformed: an incomplete group (not v0 v1 v2 v3 then a class) is skipped."""
    out, words = [], text.split()
    i = 0
    while i + 4 < len(words):
        vals = [_value(w) for w in words[i:i + 4]]
        if [v[0] if v else None for v in vals] != [0, 1, 2, 3]:
            i += 1
            continue
        j = i + 4
        while j < len(words) and _value(words[j]) is None and not words[j].startswith("["):
            j += 1
        if j > i + 4:
            x0, y0, x1, y1 = (v[1] / (bins - 1) for v in vals)
            out.append((x0, y0, x1, y1, " ".join(words[i + 4:j])))
        i = j
    return out


def palette_to_text(values: Sequence[float]) -> str:
    """Flat palette colour values (r, g, b, r, g, b, ...) -> "v1=<n/3> v0=r v0=g ..."
    (4M-21's ColorPaletteTransform.convert_palettes_to_string)."""
    vals = [round(float(v)) for v in values]
    bad = [v for v in vals if not 0 <= v < ML4M_TEXT_LAYOUT.value_bins]
    if bad:
        raise ValueError(f"palette values {bad[:5]} outside [0, {ML4M_TEXT_LAYOUT.value_bins})")
    return " ".join([f"v1={round(len(vals) / 3)}"] + [f"v0={v}" for v in vals])


def text_to_palette(text: str) -> list[tuple[int, int, int]]:
    """Decoded palette text -> RGB triples (the v0 values after the v1 count, in threes)."""
    vals = [v[1] for v in map(_value, text.split()) if v and v[0] == 0]
    return [tuple(vals[i:i + 3]) for i in range(0, len(vals) - 2, 3)]


# 4M-21's metadata fields: name -> (v1 id, how the value becomes a v0 bin). Kinds:
#   ("dim", 32)            image side in pixels // 32
#   ("int",)               the integer itself
#   ("edges", (a, b, ..))  index of the first edge above the value (bins between fixed edges)
#   ("range", lo, hi, n)   int((clip(v, lo, hi) - lo) / (hi - lo) * (n - 1))
METADATA_FIELDS: dict[str, tuple[int, tuple]] = {
    "original_width": (0, ("dim", 32)), "original_height": (1, ("dim", 32)),
    "caption_n_chars": (2, ("int",)), "caption_n_words": (3, ("int",)),
    "caption_n_sentences": (4, ("int",)), "n_humans": (5, ("int",)),
    "n_sam_instances": (6, ("int",)), "n_coco_instances": (7, ("int",)),
    "coco_instance_diversity": (8, ("int",)), "colorfulness": (9, ("range", 0, 150, 50)),
    "brightness": (10, ("range", 0, 255, 50)), "contrast": (11, ("range", 0, 127, 50)),
    "saturation": (12, ("range", 0, 255, 50)), "entropy": (13, ("range", 0, 10, 50)),
    "walkability": (14, ("range", 0, 1, 50)), "objectness": (15, ("range", 0, 1, 50)),
    "semantic_diversity": (16, ("int",)), "geometric_complexity": (17, ("range", 0, 0.75, 50)),
    "occlusion_score": (18, ("range", 0, 0.25, 50)), "watermark_score": (19, ("edges", (0.5,))),
    "aesthetic_score": (20, ("edges", (4.5, 5.5))),
}
_V0_MAX = ML4M_TEXT_LAYOUT.value_bins - 1


def metadata_bin(name: str, value: float) -> int:
    """The v0 bin of one metadata value (4M-21's MetadataTransform)."""
    if name not in METADATA_FIELDS:
        raise ValueError(f"unknown metadata field {name!r}; known: {sorted(METADATA_FIELDS)}")
    kind = METADATA_FIELDS[name][1]
    if kind[0] == "dim":
        return max(0, min(int(value) // kind[1], _V0_MAX))
    if kind[0] == "int":
        return max(0, min(int(value), _V0_MAX))
    if kind[0] == "edges":
        return sum(value >= e for e in kind[1])
    _, lo, hi, n = kind
    return int((max(lo, min(value, hi)) - lo) / (hi - lo) * (n - 1))


def metadata_to_text(metadata: Mapping[str, float], keys: Sequence[str] | None = None,
                     chunks: bool = False) -> str | list[str]:
    """Metadata {field: value} -> "v1=<field> v0=<bin> ..." in `keys` order (default: the dict's),
    as 4M-21's MetadataTransform(shuffle=False) writes it; chunks=True: one string per field."""
    keys = list(metadata) if keys is None else list(keys)
    unknown = [k for k in keys if k not in METADATA_FIELDS]
    if unknown:
        raise ValueError(f"unknown metadata fields {unknown}; known: {sorted(METADATA_FIELDS)}")
    parts = [f"v1={METADATA_FIELDS[k][0]} v0={metadata_bin(k, metadata[k])}" for k in keys]
    return parts if chunks else " ".join(parts)


def text_to_metadata(text: str) -> dict[str, int]:
    """Decoded metadata text -> {field: v0 bin} for every well-formed "v1=<id> v0=<bin>" pair."""
    names = {v[0]: k for k, v in METADATA_FIELDS.items()}
    vals = [_value(w) for w in text.split()]
    out = {}
    for a, b in zip(vals, vals[1:]):
        if a and b and a[0] == 1 and b[0] == 0 and a[1] in names:
            out[names[a[1]]] = b[1]
    return out
