"""Read back what a scene caption states (fourm.data.captions' grammar): object count, object
colours, object shapes. Used on generated captions and, for validation, on the true ones."""

from __future__ import annotations

import re

from fourm.data import captions as captions_lib
from fourm.data import scenes as scenes_lib

SHAPE_WORDS = {"sphere": "sphere", "ball": "sphere", "cube": "cube", "block": "cube",
               "cylinder": "cylinder", "cone": "cone"}
_ROOM_COLOURS = ("light blue", "pale green", "dark grey")  # wall / floor names containing object colours


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _number(word: str) -> int | None:
    if word in captions_lib.NUMBERS:
        return captions_lib.NUMBERS.index(word)
    return 1 if word in ("a", "an", "single") else None


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in SHAPE_WORDS else word


def parse_count(caption: str) -> int | None:
    """Number of objects a caption states: 'N objects', else its noun phrases ('two red cubes
    and a sphere' = 3), plus 'N more objects'. Phrases with 'the' refer back and are not counted."""
    w = _words(caption)
    if "empty" in w:
        return 0
    more = sum(_number(w[i - 2]) or 0 for i in range(2, len(w))
               if w[i] in ("object", "objects") and w[i - 1] == "more")
    for i in range(1, len(w)):
        if w[i] == "objects" and w[i - 1] != "more" and _number(w[i - 1]) is not None:
            return _number(w[i - 1])
    total = 0
    for i, word in enumerate(w):
        if _singular(word) not in SHAPE_WORDS:
            continue
        # Walk back over adjectives to the determiner / number of this noun phrase.
        j = i - 1
        while j >= 0 and _number(w[j]) is None and w[j] not in ("the", "and", "of", "is", "with"):
            j -= 1
        if j < 0 or w[j] == "the":
            continue
        n = _number(w[j])
        total += n if n is not None else 1
    total += more
    return total or None


def parse_colours(caption: str) -> set[str]:
    """Object colour words in a caption (room colours such as 'light blue' walls excluded)."""
    text = caption.lower()
    for room in _ROOM_COLOURS:
        text = text.replace(room, " ")
    return set(_words(text)) & set(scenes_lib.COLOURS)


def parse_shapes(caption: str) -> set[str]:
    """Object shapes a caption names ('ball' is a sphere, 'block' a cube)."""
    return {SHAPE_WORDS[_singular(w)] for w in _words(caption) if _singular(w) in SHAPE_WORDS}


def names_every_colour(caption: str) -> bool:
    """Whether the caption gives every object's colour: not when it ends in 'N more objects' or
    lists shapes only ('six objects on a grey floor: three cones, ...')."""
    text = " ".join(_words(caption))
    if parse_count(caption) == 0:
        return True
    return "more object" not in text and bool(parse_colours(caption))
