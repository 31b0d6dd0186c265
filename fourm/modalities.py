"""The modality registry: the one place that knows what each modality is.

Two kinds of entries, both registered here and consulted by every layer:

* a **field** (`Field`, `register_field`) is the raw side: a per-sample value with a layout
  (image, class labels, depth, normals, array, boxes, text, ...) and file formats. It is a
  subfolder of aligned folders (`fourm.data.folder`), a TFDS feature, a key of sample dicts,
  what augmentation transforms and what `fourm-generate` reads and draws;
* a **modality** (`Modality`, `register`) is the token side the model sees: its kind, vocabulary,
  grid or length, tokenizer, and the field its tokens come from (`source`).

A user's own modality is one `register_field` + one `register` call in their own module, named
by the config field `modules` (every command imports them before anything else) or published as
an entry point in the group `fourm.modalities`.

A modality is an image-like token grid (`grid`), raw pixel patches (`pixels`, encoder input only)
or a token sequence (`sequence`). Two families share the registry:

* `fourm` - our own modalities on the procedural scene data (64 px default, 8x8 token grids),
  whose vocabulary sizes come from the tokenizers we train (configs may override them);
* `ml4m`  - the names and vocabularies of the official 4M / 4M-21 models, for checkpoint loading.

Adding a modality = one `register(...)` call + a tokenizer named by `tokenizer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

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
    if mod.name in table and not overwrite and table[mod.name] != mod:
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
# Fields: the raw per-sample values modalities are made from
# ---------------------------------------------------------------------------------------------
Layout = Literal["image", "labels", "instances", "depth", "normals", "array", "boxes", "text", "json"]
# Layout -> (file extensions it can read, whether it is a [H, W(, C)] array on the pixel grid).
LAYOUTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "image": (("png", "jpg", "jpeg"), True),  # uint8 [H, W, C], C = channels (1, 3 or 4)
    "labels": (("png",), True),  # uint8 [H, W] class ids (8-bit L or P PNG)
    "instances": (("png",), True),  # int32 [H, W] instance ids (8- or 16-bit PNG), 0 = none
    "depth": (("npy", "png"), True),  # float32 [H, W] metres (.npy, or 16-bit PNG x depth_scale)
    "normals": (("png", "npy"), True),  # float32 [H, W, 3] unit vectors (PNG: (n + 1) / 2 * 255)
    "array": (("npy",), True),  # float32 [H, W] (channels None) or [H, W, C]
    "boxes": (("json",), False),  # [{"class": str, "box": [x0, y0, x1, y1]}, ...] pixels
    "text": (("txt",), False),  # UTF-8 text
    "json": (("json",), False),  # a JSON object {name: value}
}
RESERVED_FIELDS = ("stem", "intrinsics", "_index")  # sample keys that are not fields


@dataclasses.dataclass(frozen=True)
class Field:
    """A per-sample data field (see the module docstring).

    `formats`: file extensions accepted in aligned folders, the first is what writers use.
    `channels`: for `image` (1, 3 or 4) and `array` (None = [H, W]) layouts.
    `decode`: optional `bytes -> value` for a file format of your own (the layout's checks of
    shape, dtype and range still apply); `encode`: its inverse, for writers.
    `aliases`: other short names `fourm-generate` accepts (e.g. "normal" for "normals").
    """

    name: str
    layout: Layout
    formats: tuple[str, ...] = ()
    channels: int | None = None
    decode: Callable[[bytes], Any] | None = None
    encode: Callable[[Any], bytes] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def is_image_like(self) -> bool:
        return LAYOUTS[self.layout][1]


_FIELDS: dict[str, Field] = {}


def register_field(f: Field, *, overwrite: bool = False) -> Field:
    """Add a field; bad entries are refused here, before any data is read."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", f.name) or f.name in RESERVED_FIELDS:
        raise ValueError(f"field name {f.name!r}: use lowercase letters, digits and '_' (it is a "
                         f"folder name), not one of {RESERVED_FIELDS}")
    if f.layout not in LAYOUTS:
        raise ValueError(f"field {f.name!r}: layout {f.layout!r}; known: {sorted(LAYOUTS)}")
    formats = tuple(f.formats) or LAYOUTS[f.layout][0][:1]
    readable = LAYOUTS[f.layout][0]
    odd = [e for e in formats if e not in readable]
    if odd and f.decode is None:
        raise ValueError(f"field {f.name!r}: layout {f.layout!r} reads {list(readable)}, not "
                         f"{odd}; give decode= (bytes -> value) for a format of your own")
    if f.layout == "image" and f.channels not in (1, 3, 4):
        raise ValueError(f"field {f.name!r}: an image needs channels 1, 3 or 4, got {f.channels}")
    if f.layout == "normals" and f.channels not in (None, 3):
        raise ValueError(f"field {f.name!r}: normals have 3 channels, got {f.channels}")
    if f.layout == "array" and f.channels is not None and f.channels < 1:
        raise ValueError(f"field {f.name!r}: channels must be None or >= 1, got {f.channels}")
    f = dataclasses.replace(f, formats=formats, aliases=tuple(f.aliases),
                            channels=3 if f.layout == "normals" else f.channels)
    if f.name in _FIELDS and not overwrite and _FIELDS[f.name] != f:
        raise ValueError(f"field {f.name!r} already registered (as {_FIELDS[f.name]}); pass "
                         f"overwrite=True to replace it")
    _FIELDS[f.name] = f
    return f


def field(name: str) -> Field:
    if name not in _FIELDS:
        raise KeyError(f"unknown field {name!r}; registered: {list(_FIELDS)} (register your own "
                       f"with fourm.modalities.register_field, imported through the config field "
                       f"`modules`)")
    return _FIELDS[name]


def fields() -> list[Field]:
    """Every registered field, built-in ones first, in registration order."""
    return list(_FIELDS.values())


def field_names() -> list[str]:
    return list(_FIELDS)


def field_for_name(name: str) -> Field | None:
    """The field a short name or alias stands for (None if none)."""
    n = name.lower()
    return next((f for f in _FIELDS.values() if n == f.name or n in f.aliases), None)


# ---------------------------------------------------------------------------------------------
# Users' modules: imported by every command before it reads data or builds a model
# ---------------------------------------------------------------------------------------------
ENTRY_POINT_GROUP = "fourm.modalities"
_LOADED: list[str] = []


def load_modules(specs: Sequence[str] = (), *, entry_points: bool = True) -> list[str]:
    """Import users' registration modules, each once: a dotted module name or a path to a .py
    file; with `entry_points`, also every entry point of the group `fourm.modalities` (a module,
    or a `module:function` that is called). Returns the specs imported so far (what worker
    processes import again)."""
    for spec in (str(s).strip() for s in specs):
        if spec and spec not in _LOADED:
            _import(spec)
            _LOADED.append(spec)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            key = f"entry_point:{ep.name}={ep.value}"
            if key in _LOADED:
                continue
            try:
                obj = ep.load()
            except (ImportError, AttributeError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"entry point {ep.name}={ep.value} (group {ENTRY_POINT_GROUP}): "
                                 f"{type(e).__name__}: {e}") from e
            if ep.attr and callable(obj):
                obj()
            _LOADED.append(key)
    return list(_LOADED)


def loaded_modules() -> list[str]:
    return [s for s in _LOADED if not s.startswith("entry_point:")]


def _import(spec: str) -> None:
    try:
        if spec.endswith(".py"):
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            # A name fixed by the path: pickles that refer to the module (a custom decode
            # function) resolve in worker processes that import the same file.
            digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
            name = f"fourm_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
            if name in sys.modules:
                return
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(spec)
    except (ImportError, FileNotFoundError, ValueError, KeyError, TypeError, SyntaxError) as e:
        raise ValueError(f"config field modules: cannot import {spec!r}: {type(e).__name__}: "
                         f"{e}") from e


# Built-in fields: what the scene generator and aligned folders have always carried.
register_field(Field("rgb", "image", ("png", "jpg", "jpeg"), channels=3, aliases=("image",)))
register_field(Field("depth", "depth", ("npy", "png")))
register_field(Field("normals", "normals", ("png", "npy"), aliases=("normal",)))
register_field(Field("semseg", "labels", ("png",), aliases=("segmentation",)))
register_field(Field("instance", "instances", ("png",)))
register_field(Field("boxes", "boxes", ("json",), aliases=("det",)))
register_field(Field("caption", "text", ("txt",), aliases=("text",)))
register_field(Field("metadata", "json", ("json",)))


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
                  masking="span", source="caption"))
register(Modality("det", "sequence", TEXT_VOCAB, max_length=64, tokenizer="sentencepiece:text",
                  masking="span", source="boxes"))
register(Modality("metadata", "sequence", TEXT_VOCAB, max_length=48, tokenizer="sentencepiece:text",
                  masking="chunk", source="metadata"))

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
                      masking=_masking, source=_name), "ml4m")

# The modality set of 4M-7 (used for the published parameter counts).
ML4M_7 = ["rgb@224", "tok_rgb@224", "tok_depth@224", "tok_normal@224", "tok_semseg@224",
          "tok_clip@224", "caption", "det"]
