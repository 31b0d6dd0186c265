"""fourm's text tokenizer: a SentencePiece model with 4M's reserved tokens at fixed ids.

Id layout (`fourm.text_layout.TextLayout`; masking and generation read it from the modality):

    0 [PAD]   1 [UNK]   2 [SOS]   3 [EOS]
    4 .. 4+n-1                  span sentinels [S_0] .. [S_{n-1}]        (4M: [S_1] has id 5)
    then 4 groups of B          value-bin tokens v0=0 .. v0=B-1, v1=.., v2=.., v3=..
    then 256                    byte pieces <0x00> .. <0xFF> (byte fallback: any Unicode encodes)
    then learned pieces         (SentencePiece unigram/BPE, trained by us)
    then [UNUSED_k]             padding up to the configured vocabulary, only when the corpus is too
                                small to learn that many pieces (the model's vocabulary stays fixed)

Sentinels and value tokens are SentencePiece *control* symbols: SentencePiece never produces them
from raw text, so the string "v0=3" inside a word stays ordinary text. `encode` recognises them
itself when they stand as whitespace-delimited words (`"v0=3 v1=7 cube"`), strips the one space
that joins a special token to its neighbour, and `decode` puts exactly one space back. Ordinary
text is encoded with an explicit leading space (SentencePiece's dummy prefix, done by us so that
it is reversible), identity normalisation and no whitespace folding, so
`decode(encode(s)) == s` for every Python string that is valid Unicode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from fourm.io import atomic_write, inside
from fourm.text_layout import (DEFAULT_NUM_SENTINELS, DEFAULT_VALUE_BINS, NUM_VALUE_GROUPS,  # noqa: F401
                               TextLayout, check_token_ids)

VERSION = "fourm.text/1"
MODEL_FILE = "text.model"
SIDECAR_FILE = "text.json"

PAD_ID, UNK_ID, SOS_ID, EOS_ID = TextLayout.pad_id, TextLayout.unk_id, TextLayout.sos_id, TextLayout.eos_id
PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"
DEFAULT_VOCAB = 4096  # = fourm.modalities.TEXT_VOCAB
_META_SPACE = "\u2581"  # SentencePiece's whitespace symbol; a literal one goes in as bytes
_META_SPACE_BYTES = tuple(_META_SPACE.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class TextTokenizerConfig:
    vocab_size: int = DEFAULT_VOCAB
    num_sentinels: int = DEFAULT_NUM_SENTINELS
    value_bins: int = DEFAULT_VALUE_BINS
    # BPE: on small-vocabulary corpora (the scene captions) SentencePiece's unigram trainer keeps only
    # ~100 pieces (2.3 tokens per word); BPE learns the words (1.1 tokens per word).
    model_type: str = "bpe"  # or "unigram"
    seed: int = 0
    max_piece_length: int = 16

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "TextTokenizerConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def layout(self) -> TextLayout:
        return TextLayout(self.num_sentinels, self.value_bins)


# A special token counts only as a whole space-delimited word with canonical digits, so "xv0=3",
# "v0=03" or "[S_0]," stay ordinary text and still round-trip exactly. (Which of the matches are
# in range for a given layout is decided by `_special_piece_ids`.)
_SPECIAL_RE = re.compile(
    r"(?<![^ ])(\[S_(?:0|[1-9]\d*)\]|v[0-3]=(?:0|[1-9]\d*)|\[SOS\]|\[EOS\]|\[UNK\])(?![^ ])")





class TextTokenizer:
    """Encode text to ids and back with the fixed 4M-style special-token layout."""

    kind = "sequence"  # fourm.tokenizer_protocol

    def __init__(self, model_proto: bytes, meta: Mapping[str, Any], source: str = "<memory>"):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._source = source
        self._meta = dict(meta)
        self.layout = TextLayout(int(meta["num_sentinels"]), int(meta["value_bins"]))
        self._config_hash = hashlib.sha256(model_proto).hexdigest()[:16]
        self._check_layout()
        self._special_re = _SPECIAL_RE
        self._special_ids = _special_piece_ids(self.layout)
        n = self._sp.get_piece_size()
        # What each id is: 0 plain piece, 1 pad, 2 rendered-as-word special, 3 unused.
        kind = np.zeros(n, np.int8)
        kind[PAD_ID] = 1
        kind[[UNK_ID, SOS_ID, EOS_ID]] = 2
        kind[self.layout.sentinel_base:self.layout.first_byte_id] = 2
        kind[[i for i in range(n) if self._sp.is_unused(i)]] = 3
        self._kind = kind

    # ----------------------------------------------------------------------------- properties
    vocab_size = property(lambda self: self._sp.get_piece_size())
    pad_id = property(lambda self: PAD_ID)
    unk_id = property(lambda self: UNK_ID)
    sos_id = property(lambda self: SOS_ID)
    eos_id = property(lambda self: EOS_ID)
    num_sentinels = property(lambda self: self.layout.num_sentinels)
    value_bins = property(lambda self: self.layout.value_bins)
    config_hash = property(lambda self: self._config_hash)
    version = property(lambda self: VERSION)
    num_learned_pieces = property(lambda self: int(self._meta.get("num_learned_pieces", 0)))

    def sentinel_id(self, i: int) -> int:
        return self.layout.sentinel_id(i)

    def value_id(self, group: int, bin_: int) -> int:
        return self.layout.value_id(group, bin_)

    def id_to_piece(self, i: int) -> str:
        self._check_ids([i])
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, sentinels={self.num_sentinels}, "
                f"value_bins={self.value_bins}, hash={self.config_hash}, source={self._source})")

    def _check_layout(self) -> None:
        expect = {PAD_ID: PAD, UNK_ID: UNK, SOS_ID: SOS, EOS_ID: EOS}
        lay = self.layout
        expect.update({lay.sentinel_id(0): "[S_0]",
                       lay.value_id(NUM_VALUE_GROUPS - 1, lay.value_bins - 1):
                           f"v{NUM_VALUE_GROUPS - 1}={lay.value_bins - 1}",
                       lay.first_byte_id: "<0x00>", lay.first_learned_id - 1: "<0xFF>"})
        for i, piece in expect.items():
            got = self._sp.id_to_piece(i) if i < self._sp.get_piece_size() else None
            if got != piece:
                raise ValueError(f"text tokenizer {self._source}: id {i} is {got!r}, expected "
                                 f"{piece!r}; the model does not follow fourm's id layout {lay}")

    # ----------------------------------------------------------------------------- encode
    def _encode_plain(self, s: str) -> list[int]:
        # Our own dummy prefix: words at the start get the same "▁word" pieces as mid-text.
        first, *rest = s.split(_META_SPACE)
        ids = list(self._sp.encode(" " + first))
        meta_bytes = [self.layout.first_byte_id + b for b in _META_SPACE_BYTES]
        for r in rest:
            ids += meta_bytes + (list(self._sp.encode(r)) if r else [])
        return ids

    def encode(self, text: str, *, allow_empty: bool = False) -> list[int]:
        """Token ids of `text` (no SOS/EOS added). Empty text is an error unless allow_empty."""
        if not isinstance(text, str):
            raise TypeError(f"text tokenizer encodes str, got {type(text).__name__}: {text!r:.80}")
        if not text:
            if allow_empty:
                return []
            raise ValueError("cannot encode empty text (pass allow_empty=True where an empty "
                             "sequence is meaningful, e.g. a scene without boxes)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text has a character that is not valid Unicode text "
                             f"({text[e.start]!r} at position {e.start}, a lone surrogate?); "
                             f"text starts {text[:40]!r}") from None
        ids: list[int] = []
        for seg in _split_specials(text, self._special_re, self._special_ids):
            if isinstance(seg, int):
                ids.append(seg)
            else:
                ids += self._encode_plain(seg)
        return ids

    def encode_array(self, text: str, *, allow_empty: bool = False) -> np.ndarray:
        return np.asarray(self.encode(text, allow_empty=allow_empty), np.int32)

    # ----------------------------------------------------------------------------- decode
    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        return check_token_ids(ids, self.vocab_size, self._source)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: PAD dropped, sentinels/values/SOS/EOS/UNK as readable words."""
        words: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                s = self._sp.decode(run)
                words.append(s[1:] if s.startswith(" ") else s)
                run.clear()

        for i in self._check_ids(ids):
            kind = self._kind[i]
            if kind == 0:
                run.append(i)
            elif kind != 1:  # PAD never splits a run: it carries no text
                flush()
                words.append(self._sp.id_to_piece(i))
        flush()
        return " ".join(words)

    # ----------------------------------------------------------------------------- I/O
    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        proto = self._sp.serialized_model_proto()
        atomic_write(out / MODEL_FILE, proto)
        meta = dict(self._meta, version=VERSION, config_hash=self.config_hash,
                    vocab_size=self.vocab_size, model_sha256=hashlib.sha256(proto).hexdigest(),
                    layout=dict(pad=PAD_ID, unk=UNK_ID, sos=SOS_ID, eos=EOS_ID,
                                first_sentinel=TextLayout.sentinel_base, first_value=self.layout.value_id(0, 0),
                                first_byte=self.layout.first_byte_id,
                                first_learned=self.layout.first_learned_id),
                    sentencepiece_version=spm.__version__)
        # The sidecar goes last: a directory with a sidecar has a complete model next to it.
        atomic_write(out / SIDECAR_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TextTokenizer":
        d = Path(directory)
        model, side = inside(d, MODEL_FILE, "text tokenizer"), inside(d, SIDECAR_FILE, "text tokenizer")
        for p in (model, side):
            if not p.is_file():
                raise FileNotFoundError(f"text tokenizer: {p} is missing (train one with "
                                        f"fourm-train-text-tokenizer, which writes {MODEL_FILE} "
                                        f"and {SIDECAR_FILE})")
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"text tokenizer sidecar {side} is not valid JSON: {e}") from None
        for key in ("num_sentinels", "value_bins", "model_sha256", "version"):
            if key not in meta:
                raise ValueError(f"text tokenizer sidecar {side} lacks field {key!r}")
        if meta["version"] != VERSION:
            raise ValueError(f"{side}: version {meta['version']!r}, this code reads {VERSION!r}")
        proto = model.read_bytes()
        if hashlib.sha256(proto).hexdigest() != meta["model_sha256"]:
            raise ValueError(f"{model} does not match the sha256 recorded in {side} "
                             f"(files from different trainings?)")
        return cls(proto, meta, source=str(d))

    # ----------------------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], out_dir: str | os.PathLike | None,
              cfg: Mapping[str, Any] | TextTokenizerConfig | None = None) -> "TextTokenizer":
        """Train on `texts` (deterministic: one thread, all sentences, fixed seed) and save."""
        c = TextTokenizerConfig.from_mapping(cfg)
        lay = c.layout
        if c.vocab_size < lay.first_learned_id + 1:
            raise ValueError(f"vocab_size {c.vocab_size} leaves no room for learned pieces: the "
                             f"reserved layout {lay} takes {lay.first_learned_id} ids")
        if c.model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {c.model_type!r}")
        regex, piece_ids = _SPECIAL_RE, _special_piece_ids(lay)
        sentences = [s for t in texts for s in _training_sentences(t, regex, piece_ids)]
        if not sentences:
            raise ValueError("no training text: the corpus is empty")
        sentences.sort()  # order-independent result; SentencePiece counts, order only breaks ties
        spm.set_random_generator_seed(int(c.seed))
        buf = _BytesSink()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=c.vocab_size,
            model_type=c.model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=SOS_ID, eos_id=EOS_ID,
            pad_piece=PAD, unk_piece=UNK, bos_piece=SOS, eos_piece=EOS,
            control_symbols=lay.special_pieces(), byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, max_sentencepiece_length=c.max_piece_length,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            hard_vocab_limit=False, max_sentence_length=1 << 16, minloglevel=2)
        proto = sp_pb.ModelProto()
        proto.ParseFromString(buf.data)
        learned = len(proto.pieces) - lay.first_learned_id
        if not any(p.piece == _META_SPACE for p in proto.pieces):
            # Without a "▁" piece spaces would fall back to the bytes of U+2581 and decode wrong.
            raise ValueError("training produced no whitespace piece; the corpus has no plain text")
        # Small corpora cannot fill the vocabulary; pad with never-produced pieces so the
        # model's vocabulary (and the registry's TEXT_VOCAB) does not depend on the corpus.
        for k in range(c.vocab_size - len(proto.pieces)):
            p = proto.pieces.add()
            p.piece, p.score, p.type = f"[UNUSED_{k}]", 0.0, sp_pb.ModelProto.SentencePiece.UNUSED
        meta = dict(dataclasses.asdict(c), num_learned_pieces=learned,
                    num_unused_pieces=c.vocab_size - lay.first_learned_id - learned,
                    num_training_sentences=len(sentences))
        tok = cls(proto.SerializeToString(), meta,
                  source=str(out_dir) if out_dir is not None else "<memory>")
        if out_dir is not None:
            tok.save(out_dir)
        return tok


def train(texts: Iterable[str], out_dir, cfg=None) -> TextTokenizer:
    return TextTokenizer.train(texts, out_dir, cfg)


def load(directory) -> TextTokenizer:
    return TextTokenizer.load(directory)


class _BytesSink:
    def __init__(self):
        self.data = b""

    def write(self, b: bytes) -> None:
        self.data += b


def _special_piece_ids(layout: TextLayout) -> dict[str, int]:
    ids = {p: layout.sentinel_base + k for k, p in enumerate(layout.special_pieces())}
    ids.update({UNK: UNK_ID, SOS: SOS_ID, EOS: EOS_ID})
    return ids


def _split_specials(text: str, regex: re.Pattern, piece_ids: Mapping[str, int]) -> list[int | str]:
    """Split text into special-token ids and the plain text between them, joins removed.

    A special token stands as a space-delimited word; the one space joining it to a neighbour is
    dropped here and re-inserted by `decode`. Plain text between two specials keeps its inner
    part (possibly "" for a double space, which must still produce a token); a lone joining space
    produces nothing. Words that look special but are out of range (v0=5000) stay plain text.
    """
    spans = [(m.start(), m.end(), piece_ids[m.group()]) for m in regex.finditer(text)
             if m.group() in piece_ids]
    if not spans:
        return [text] if text else []
    out: list[int | str] = []
    pos = 0
    for k, (start, end, i) in enumerate(spans):
        plain = text[pos:start]
        if k == 0:
            if plain:
                out.append(plain[:-1])
        elif plain != " ":
            out.append(plain[1:-1])
        out.append(i)
        pos = end
    if text[pos:]:
        out.append(text[pos + 1:])
    return out


def _training_sentences(text: str, regex: re.Pattern, piece_ids: Mapping[str, int]) -> list[str]:
    """The strings `encode` would hand to SentencePiece for `text` (so training sees the same)."""
    if not isinstance(text, str):
        raise TypeError(f"training texts must be str, got {type(text).__name__}: {text!r:.80}")
    out = []
    for seg in _split_specials(text, regex, piece_ids):
        if isinstance(seg, str):
            first, *rest = seg.split(_META_SPACE)
            out += [" " + first] + rest
    return [s for s in out if s.strip()]
