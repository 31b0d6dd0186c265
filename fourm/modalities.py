"""The modality registry: the one place that knows what each modality is.

A modality is an image-like token grid (`grid`), raw pixel patches (`pixels`, encoder input only)
or a token sequence (`sequence`). Two families share the registry:

* `fourm` - our own modalities on the procedural scene data (64 px default, 8x8 token grids),
  whose vocabulary sizes come from the tokenizers we train (configs may override them);
* `ml4m`  - the names and vocabularies of the official 4M / 4M-21 models, for checkpoint loading.

Adding a modality = one `register(...)` call + a tokenizer named by `tokenizer`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fourm.text_layout import FOURM as FOURM_TEXT, ML4M as ML4M_TEXT, TextLayout

Kind = Literal["grid", "pixels", "sequence"]


@dataclasses.dataclass(frozen=True)
class Modality:
    name: str
    kind: Kind
    vocab_size: int = 0  # 0 for pixel inputs
    grid: tuple[int, int] | None = None  # token grid (grid) or patch grid (pixels)
    max_length: int | None = None  # sequences
    tokenizer: str = ""  # e.g. "vq:rgb", "sentencepiece:text", "patches"
    patch_size: int | None = None  # pixels: patch side in pixels
    channels: int | None = None  # pixels: input channels
    masking: Literal["grid", "span", "chunk"] = "grid"  # how masking treats it
    source: str = ""  # dataset field the tokens come from (e.g. "rgb", "caption")
    text: TextLayout | None = None  # sequences: the reserved ids (PAD/EOS, sentinels) of its vocabulary

    def __post_init__(self):
        if self.kind == "sequence" and self.text is None:  # fourm's own text tokenizer's layout
            object.__setattr__(self, "text", FOURM_TEXT)

    @property
    def num_tokens(self) -> int:
        if self.kind == "sequence":
            return int(self.max_length)
        return int(self.grid[0] * self.grid[1])

    @property
    def is_image_like(self) -> bool:
        return self.kind in ("grid", "pixels")

    def with_vocab(self, vocab_size: int) -> "Modality":
        return dataclasses.replace(self, vocab_size=int(vocab_size))


_REGISTRY: dict[str, dict[str, Modality]] = {"fourm": {}, "ml4m": {}}


def register(mod: Modality, family: str = "fourm", *, overwrite: bool = False) -> Modality:
    table = _REGISTRY.setdefault(family, {})
    if mod.name in table and not overwrite:
        raise ValueError(f"modality {mod.name!r} already registered in family {family!r}")
    table[mod.name] = mod
    return mod


def get(name: str, family: str = "fourm") -> Modality:
    table = _REGISTRY.get(family)
    if table is None:
        raise KeyError(f"unknown modality family {family!r}; known: {sorted(_REGISTRY)}")
    if name not in table:
        raise KeyError(f"unknown modality {name!r} in family {family!r}; known: {sorted(table)}")
    return table[name]


def names(family: str = "fourm") -> list[str]:
    return sorted(_REGISTRY[family])


def resolve(mod_names, family: str = "fourm", vocab_overrides: dict | None = None) -> list[Modality]:
    """Registry entries for `mod_names`, in the given order, with optional vocabulary overrides."""
    vocab_overrides = dict(vocab_overrides or {})
    out = []
    for n in mod_names:
        m = get(n, family)
        if n in vocab_overrides:
            m = m.with_vocab(vocab_overrides.pop(n))
        out.append(m)
    if vocab_overrides:
        raise KeyError(f"vocab overrides for modalities not in the list: {sorted(vocab_overrides)}")
    return out


# ---------------------------------------------------------------------------------------------
# fourm's own modalities on the scene data. Resolution-suffixed names, as 4M does ("@64").
# Token grids: 64 px / 8 px per token = 8x8; at 224 px, 14x14 (as 4M). Vocabularies are the
# defaults of our tokenizer configs; the trainer checks them against the pre-tokenized manifest.
# ---------------------------------------------------------------------------------------------
def _register_fourm(res: int, grid: int, patch: int):
    register(Modality(f"rgb@{res}", "pixels", grid=(grid, grid), patch_size=patch, channels=3,
                      tokenizer="patches", source="rgb"))
    register(Modality(f"tok_rgb@{res}", "grid", 1024, (grid, grid), tokenizer="vq:rgb", source="rgb"))
    register(Modality(f"tok_depth@{res}", "grid", 1024, (grid, grid), tokenizer="vq:depth", source="depth"))
    register(Modality(f"tok_normal@{res}", "grid", 1024, (grid, grid), tokenizer="vq:normals", source="normals"))
    register(Modality(f"tok_semseg@{res}", "grid", 1024, (grid, grid), tokenizer="vq:semseg", source="semseg"))


_register_fourm(64, 8, 8)
_register_fourm(224, 14, 16)

TEXT_VOCAB = 4096  # default SentencePiece vocabulary of fourm's text tokenizer
register(Modality("caption", "sequence", TEXT_VOCAB, max_length=64, tokenizer="sentencepiece:text",
                  masking="span", source="caption", text=FOURM_TEXT))
register(Modality("det", "sequence", TEXT_VOCAB, max_length=64, tokenizer="sentencepiece:text",
                  masking="span", source="boxes", text=FOURM_TEXT))
register(Modality("metadata", "sequence", TEXT_VOCAB, max_length=48, tokenizer="sentencepiece:text",
                  masking="chunk", source="metadata", text=FOURM_TEXT))

# ---------------------------------------------------------------------------------------------
# Official 4M / 4M-21 modalities (names and vocabularies of the released models).
# ---------------------------------------------------------------------------------------------
for _res, _grid in ((224, 14), (448, 28)):
    register(Modality(f"rgb@{_res}", "pixels", grid=(_grid, _grid), patch_size=16, channels=3,
                      tokenizer="patches", source="rgb"), "ml4m")
    for _name, _vocab in (("tok_rgb", 16384), ("tok_depth", 8192), ("tok_normal", 8192),
                          ("tok_semseg", 4096), ("tok_clip", 8192)):
        register(Modality(f"{_name}@{_res}", "grid", _vocab, (_grid, _grid), tokenizer=f"vq:{_name[4:]}",
                          source=_name[4:]), "ml4m")
for _name, _len, _masking in (("caption", 256, "span"), ("det", 256, "span"),
                              ("metadata", 40, "chunk")):
    register(Modality(_name, "sequence", 30000, max_length=_len, tokenizer="wordpiece:4m",
                      masking=_masking, source=_name, text=ML4M_TEXT), "ml4m")

# The modality set of 4M-7 (used for the published parameter counts).
ML4M_7 = ["rgb@224", "tok_rgb@224", "tok_depth@224", "tok_normal@224", "tok_semseg@224",
          "tok_clip@224", "caption", "det"]
