"""Host-side inputs of generation: conditions -> per-modality state -> encoder slots.

A modality's generation state (`ModState`) is its tokens and which of them are known:
  grid      ids int32[B, N] in raster order, known bool[B, N]
  pixels    image float32[B, H, W, C] (ImageNet-normalised, as the masking writes it), known
            bool[B, N] over patches
  sequence  ids int32[B, L] left-packed (the encoder input, may contain sentinels), known =
            the valid prefix

Conditions are given per modality as: an image array (pixels; or a native depth/normals/semseg
array that a tokenizer turns into tokens), token ids, text (str), or `Partial(value, known)` for
a grid modality given at some positions only. Text with sentinels ("a red [S_1] left of a blue
sphere") is a partly given sequence: as a target, the sentinels' spans are generated.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from fourm.batch import PIXELS_PREFIX, normalise_pixels
from fourm.modalities import Modality

log = logging.getLogger(__name__)

SEQ_BUCKET = 16  # sequence condition slots are rounded up to this, to limit recompilation


class GenerationInputError(ValueError):
    """A condition or target that cannot be used (names the modality, expected vs got)."""


@dataclasses.dataclass
class Partial:
    """A grid modality given at some positions: value (tokens or a native array) and `known`
    bool [gh, gw] / [B, gh, gw] (True = given; the rest is generated when it is a target)."""

    value: Any
    known: Any


@dataclasses.dataclass
class Normalised:
    """Pixels already normalised as the model's input ((x - ImageNet mean) / std, float32,
    [H, W, C] or [B, H, W, C]): used as given (e.g. tensors taken from another pipeline)."""

    pixels: Any


@dataclasses.dataclass
class ModState:
    ids: np.ndarray | None  # int32 [B, L] (None for pixels)
    known: np.ndarray  # bool [B, L]
    pixels: np.ndarray | None = None  # float32 [B, H, W, C]

    @property
    def fully_known(self) -> bool:
        return bool(self.known.all())

    def repeat(self, n: int) -> "ModState":
        r = lambda a: None if a is None else np.repeat(a, n, axis=0)  # noqa: E731
        return ModState(r(self.ids), r(self.known), r(self.pixels))


# ------------------------------------------------------------------------------------------
# Batch size: each condition may be one sample (broadcast) or a batch; all batches must agree.
# ------------------------------------------------------------------------------------------
def broadcast_states(states: dict[str, ModState], batch: int | None = None) -> tuple[dict, int]:
    sizes = {n: st.known.shape[0] for n, st in states.items()}
    many = {n: b for n, b in sizes.items() if b != 1}
    if len(set(many.values())) > 1:
        raise GenerationInputError(f"conditions have different batch sizes: {many}")
    b = next(iter(many.values()), 1)
    if batch is not None:
        if many and b != batch:
            raise GenerationInputError(f"batch_size={batch} but the conditions have batch {b}")
        b = batch
    return {n: (st.repeat(b) if st.known.shape[0] == 1 and b != 1 else st)
            for n, st in states.items()}, b


# ------------------------------------------------------------------------------------------
# Per-kind preparation
# ------------------------------------------------------------------------------------------
def prepare_pixels(mod: Modality, value, *, resize: bool, notices: list[str]) -> ModState:
    normalised = isinstance(value, Normalised)
    x = np.asarray(value.pixels if normalised else value)
    if x.ndim == 3:
        x = x[None]
    h, w = mod.grid[0] * mod.patch_size, mod.grid[1] * mod.patch_size
    if x.ndim != 4 or x.shape[-1] != mod.channels:
        raise GenerationInputError(f"condition {mod.name!r}: expected an image [H, W, {mod.channels}] "
                                   f"or [B, H, W, {mod.channels}], got shape {list(x.shape)}")
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
        raise GenerationInputError(f"condition {mod.name!r}: expected uint8 or float pixels, got {x.dtype}")
    if normalised:
        if x.shape[1:3] != (h, w):
            raise GenerationInputError(f"condition {mod.name!r}: normalised pixels of shape "
                                       f"{list(x.shape)}, expected [B, {h}, {w}, {mod.channels}]")
        x = np.ascontiguousarray(x, np.float32)
        return ModState(None, np.ones((x.shape[0], mod.num_tokens), bool), x)
    if x.shape[1:3] != (h, w):
        msg = (f"condition {mod.name!r}: image is {x.shape[2]}x{x.shape[1]} (WxH), the model "
               f"expects {w}x{h}")
        if not resize:
            raise GenerationInputError(msg + " (resizing is off)")
        notices.append(msg + "; resized (bicubic)")
        log.warning(notices[-1])
        x = resize_images(x, h, w)
    pixels = np.stack([normalise_pixels(np.ascontiguousarray(im)) for im in x])
    return ModState(None, np.ones((x.shape[0], mod.num_tokens), bool), pixels)


def resize_images(x: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    out = []
    for im in x:
        if im.dtype != np.uint8:
            im = (np.clip(im, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)))
    return np.stack(out)


def prepare_grid(mod: Modality, value, tokenizer, *, resize: bool,
                 notices: list[str]) -> ModState:
    known = None
    if isinstance(value, Partial):
        value, known = value.value, np.asarray(value.known, bool)
    a = np.asarray(value)
    gh, gw = mod.grid
    if np.issubdtype(a.dtype, np.integer) and (a.shape[-2:] == (gh, gw) or a.shape[-1] == gh * gw):
        ids = a.reshape((-1, gh * gw)) if a.shape[-2:] == (gh, gw) or a.ndim <= 2 else None
        if ids is None:
            raise GenerationInputError(f"condition {mod.name!r}: token ids of shape {list(a.shape)}")
        bad = (ids < 0) | (ids >= mod.vocab_size)
        if bad.any():
            raise GenerationInputError(f"condition {mod.name!r}: {int(bad.sum())} token ids outside "
                                       f"[0, {mod.vocab_size}) (min {ids.min()}, max {ids.max()})")
    else:
        if tokenizer is None:
            raise GenerationInputError(
                f"condition {mod.name!r}: got a native array of shape {list(a.shape)} ({a.dtype}) "
                f"but no tokenizer for {mod.name!r} to turn it into tokens; pass token ids "
                f"[{gh}, {gw}] or load the tokenizers")
        native = a if a.ndim == len(tokenizer.codec.expected_shape(tokenizer.resolution)) else a[None]
        res = tokenizer.resolution
        if native.shape[1:3] != (res, res) and not resize:
            raise GenerationInputError(f"condition {mod.name!r}: array is {native.shape[2]}x"
                                       f"{native.shape[1]}, the tokenizer expects {res}x{res} "
                                       "(resizing is off)")
        if native.shape[1:3] != (res, res):
            notices.append(f"condition {mod.name!r}: {native.shape[2]}x{native.shape[1]} array "
                           f"resized to {res}x{res}")
            log.warning(notices[-1])
            native = tokenizer.codec.resize(native, res)
        ids = np.asarray(tokenizer.encode(native)).reshape(-1, gh * gw)
    if known is None:
        known = np.ones(ids.shape, bool)
    else:
        if known.shape[-1] != gh * gw and known.shape[-2:] != (gh, gw):
            raise GenerationInputError(f"condition {mod.name!r}: known mask of shape "
                                       f"{list(known.shape)}, expected [{gh}, {gw}] or [B, {gh}, {gw}]")
        known = known.reshape(-1, gh * gw)
        if known.shape[0] != ids.shape[0]:
            n = max(known.shape[0], ids.shape[0])
            if 1 not in (known.shape[0], ids.shape[0]):
                raise GenerationInputError(f"condition {mod.name!r}: {ids.shape[0]} token grids but "
                                           f"{known.shape[0]} known masks")
            ids, known = np.broadcast_to(ids, (n, gh * gw)), np.broadcast_to(known, (n, gh * gw))
    return ModState(np.ascontiguousarray(ids, np.int32), np.ascontiguousarray(known))


def encode_text(mod: Modality, text: str, text_tokenizer) -> list[int]:
    """Text -> encoder input ids in 4M's format: the words, then EOS unless the text ends with a
    sentinel (a masked final span, whose generated content ends with EOS)."""
    if text_tokenizer is None:
        raise GenerationInputError(f"condition {mod.name!r} is text but no text tokenizer was given")
    toks = [int(t) for t in text_tokenizer.encode(text, allow_empty=True)]
    if not toks or toks[-1] not in mod.text.sentinel_ids:
        toks.append(mod.text.eos_id)
    return toks


def prepare_sequence(mod: Modality, value, text_tokenizer) -> ModState:
    if isinstance(value, str):
        rows = [encode_text(mod, value, text_tokenizer)]
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        rows = [encode_text(mod, v, text_tokenizer) for v in value]
    else:
        a = np.asarray(value)
        if not np.issubdtype(a.dtype, np.integer) or a.ndim not in (1, 2):
            raise GenerationInputError(f"condition {mod.name!r}: expected text or token ids [L] / "
                                       f"[B, L], got {a.dtype}{list(a.shape)}")
        a = a[None] if a.ndim == 1 else a
        rows = [[int(t) for t in r if t != mod.text.pad_id] for r in a]
    return pack_sequences(mod, rows)


def pack_sequences(mod: Modality, rows: Sequence[Sequence[int]]) -> ModState:
    """Left-packed [B, W] ids (W = longest row rounded up to SEQ_BUCKET) and their valid mask."""
    batch = len(rows)
    longest = max(len(r) for r in rows)
    if longest > mod.max_length:
        raise GenerationInputError(f"condition {mod.name!r}: {longest} tokens, the model's maximum "
                                   f"for {mod.name!r} is {mod.max_length}")
    for r in rows:
        bad = [t for t in r if not 0 <= t < mod.vocab_size]
        if bad:
            raise GenerationInputError(f"condition {mod.name!r}: token ids {bad[:5]} outside "
                                       f"[0, {mod.vocab_size})")
    width = min(mod.max_length, max(SEQ_BUCKET, -(-longest // SEQ_BUCKET) * SEQ_BUCKET))
    out = np.full((batch, width), mod.text.pad_id, np.int32)
    known = np.zeros((batch, width), bool)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
        known[b, :len(r)] = True
    return ModState(out, known)


# ------------------------------------------------------------------------------------------
# Encoder slots for a set of conditions, stacked over guidance groups
# ------------------------------------------------------------------------------------------
def condition_slots(spec, states: dict[str, ModState], names: Sequence[str],
                    removed_per_group: Sequence[frozenset], batch: int) -> dict[str, np.ndarray]:
    """`fourm.batch` encoder arrays for the given condition modalities: one block of slots per
    modality (its whole token range; unknown positions are padding), rows stacked per guidance
    group (group g has the modalities in removed_per_group[g] marked invalid: 'conditions
    removed')."""
    groups = []
    for removed in removed_per_group:
        cols = {k: [np.zeros((batch, 0), np.int32)] for k in ("enc_ids", "enc_mod", "enc_pos")}
        cols["enc_valid"] = [np.zeros((batch, 0), bool)]
        pix = {}
        for name in names:
            st, mi = states[name], spec.index(name)
            b, n = st.known.shape
            cols["enc_ids"].append(st.ids if st.ids is not None else np.zeros((b, n), np.int32))
            cols["enc_mod"].append(np.full((b, n), mi, np.int32))
            cols["enc_pos"].append(np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)))
            cols["enc_valid"].append(st.known & (name not in removed))
            if st.pixels is not None:
                pix[PIXELS_PREFIX + name] = st.pixels
        b = batch
        for i in spec.inputs:  # the encoder takes every pixel input; absent ones stay unused
            m = spec.modalities[i]
            if m.kind == "pixels" and PIXELS_PREFIX + m.name not in pix:
                hw = (m.grid[0] * m.patch_size, m.grid[1] * m.patch_size)
                pix[PIXELS_PREFIX + m.name] = np.zeros((b,) + hw + (m.channels,), np.float32)
        groups.append({**{k: np.concatenate(v, axis=1) for k, v in cols.items()}, **pix})
    return {k: np.concatenate([g[k] for g in groups], axis=0) for k in groups[0]}


def needing_tokenizer(spec, conditions: Mapping[str, Any]) -> list[str]:
    """The conditions that go through a tokenizer: text, and grids given natively (not as ids)."""
    out = []
    for name, value in conditions.items():
        m = spec.modality(name)
        a = value if hasattr(value, "dtype") else None
        if m.kind == "sequence":
            native = a is None or not np.issubdtype(a.dtype, np.integer)
        elif m.kind == "grid":
            a = np.asarray(value)
            native = not (np.issubdtype(a.dtype, np.integer)
                          and (a.shape[-2:] == tuple(m.grid) or a.shape[-1] == m.num_tokens))
        else:
            native = False
        if native:
            out.append(name)
    return out
