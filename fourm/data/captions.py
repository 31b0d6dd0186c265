"""Natural, varied English captions built from a scene's visible objects.

Every statement a caption makes is true of the rendered image: counts are of visible objects,
"left of" / "right of" compare positions across the image, "behind" / "in front of" compare
distances from the camera, and the floor / wall colours are those rendered. Variety comes from
several sentence plans, optional adjectives and a few synonyms, chosen with the scene's own
random generator (so captions are deterministic per scene). Captions stay below MAX_WORDS words
so that they fit a 64-token sequence of a ~4k-vocabulary SentencePiece model.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

MAX_WORDS = 34
NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SYNONYMS = {"sphere": ["sphere", "sphere", "sphere", "ball"], "cube": ["cube", "cube", "cube", "block"],
            "cylinder": ["cylinder"], "cone": ["cone"]}
_LEFT = ["left of", "to the left of"]
_RIGHT = ["right of", "to the right of"]
_BEHIND = ["behind", "further back than"]
_FRONT = ["in front of", "closer to the camera than"]


def number_word(n: int) -> str:
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "ch")) else noun + "s"


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def relation(a: dict, b: dict) -> str:
    """Canonical spatial relation of object `a` to object `b` from camera-frame centres
    (x_cam right, z_cam forward, metres): the larger of the lateral and the depth offset wins."""
    dx, dz = a["x_cam"] - b["x_cam"], a["z_cam"] - b["z_cam"]
    if abs(dx) >= abs(dz):
        return "left of" if dx < 0 else "right of"
    return "behind" if dz > 0 else "in front of"


def _relation_phrase(a, b, rng) -> str:
    rel = relation(a, b)
    options = {"left of": _LEFT, "right of": _RIGHT, "behind": _BEHIND, "in front of": _FRONT}[rel]
    return options[int(rng.integers(len(options)))]


class _Namer:
    """Noun phrases for objects, with adjectives chosen once per caption."""

    def __init__(self, objects: Sequence[dict], rng: np.random.Generator):
        self.use_size = rng.random() < 0.7
        self.use_material = rng.random() < 0.35
        self.nouns = [SYNONYMS[o["shape"]][int(rng.integers(len(SYNONYMS[o["shape"]])))] for o in objects]

    def full(self, i: int, o: dict, article: bool = True) -> str:
        words = []
        if self.use_size:
            words.append(o["size"])
        if self.use_material:
            words.append("shiny" if o["material"] == "shiny" else "matte")
        words += [o["colour"], self.nouns[i]]
        text = " ".join(words)
        return with_article(text) if article else "the " + text

    def short(self, i: int, o: dict) -> str:
        return f"the {o['colour']} {self.nouns[i]}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _groups(objects: Sequence[dict], with_colour: bool) -> str:
    """'two red cubes, a blue sphere and a cone' style summary (grouped by colour + shape)."""
    key = (lambda o: (o["colour"], o["shape"])) if with_colour else (lambda o: ("", o["shape"]))
    counts = Counter(key(o) for o in objects)
    parts = []
    for (colour, shape), n in counts.items():
        noun = shape if n == 1 else plural(shape)
        words = f"{colour} {noun}".strip()
        parts.append(with_article(words) if n == 1 else f"{number_word(n)} {words}")
    return _join(parts)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _plan_single(o, namer, floor, wall, rng):
    obj = namer.full(0, o)
    plans = [f"{obj} on a {floor} floor",
             f"a single {obj[2:] if obj.startswith('a ') else obj[3:]} in front of a {wall} wall",
             f"there is one {obj[2:] if obj.startswith('a ') else obj[3:]} in the room",
             f"{obj} stands on the {floor} floor of a room with {wall} walls"]
    return _sentence(plans[int(rng.integers(len(plans)))])


def _plan_list_with_relation(objs, namer, floor, wall, rng):
    n = len(objs)
    i, j = 0, 1
    head = f"{namer.full(i, objs[i])} {_relation_phrase(objs[i], objs[j], rng)} {namer.full(j, objs[j])}"
    rest = [namer.full(k, objs[k]) for k in range(2, n)]
    intro = [f"{number_word(n)} objects on a {floor} floor",
             f"{number_word(n)} objects in front of a {wall} wall",
             f"a room with {wall} walls and {number_word(n)} objects"][int(rng.integers(3))]
    body = _join([head] + rest)
    return _sentence(f"{intro}: {body}")


def _plan_groups(objs, namer, floor, wall, rng):
    where = [f"on a {floor} floor", f"in a room with {wall} walls", f"in front of a {wall} wall"]
    text = _sentence(f"{_groups(objs, with_colour=True)} {where[int(rng.integers(len(where)))]}")
    i, j = rng.choice(len(objs), size=2, replace=False)
    a, b = namer.short(i, objs[i]), namer.short(j, objs[j])
    if a != b:  # only relate objects the reader can tell apart
        text += " " + _sentence(f"{a} is {_relation_phrase(objs[i], objs[j], rng)} {b}")
    return text


def _plan_pair_focus(objs, namer, floor, wall, rng):
    i, j = rng.choice(len(objs), size=2, replace=False)
    head = f"{namer.full(i, objs[i])} is {_relation_phrase(objs[i], objs[j], rng)} {namer.full(j, objs[j])}"
    others = [k for k in range(len(objs)) if k not in (i, j)]
    if not others:
        tail = [f" on a {floor} floor", f" in a room with {wall} walls", ""][int(rng.integers(3))]
        return _sentence(head + tail)
    m = len(others)
    tails = [f", with {number_word(m)} more object{'s' if m > 1 else ''} nearby",
             f"; there {'is' if m == 1 else 'are'} also {_join([namer.full(k, objs[k]) for k in others])}"]
    return _sentence(head + tails[int(rng.integers(len(tails)))])


def _plan_room(objs, namer, floor, wall, rng):
    n = len(objs)
    verb = "stands" if n == 1 else "stand"
    return _sentence(f"in a room with {wall} walls, {_join([namer.full(k, o) for k, o in enumerate(objs)])} "
                     f"{verb} on the {floor} floor")


def _plan_compact(objs, floor):
    groups = _groups(objs, with_colour=False)
    return _sentence(f"{number_word(len(objs))} objects on a {floor} floor: {groups}")


def make_caption(objects: Sequence[dict], floor: str, wall: str, rng: np.random.Generator) -> str:
    """Caption for `objects` (dicts with shape, colour, size, material, x_cam, z_cam), listed in
    any order; `floor` / `wall` are colour names."""
    objs = list(objects)
    if not objs:
        return _sentence(f"an empty room with a {floor} floor and {wall} walls")
    # Describe objects left to right, as a reader scans the image.
    objs.sort(key=lambda o: o["x_cam"])
    namer = _Namer(objs, rng)
    if len(objs) == 1:
        return _plan_single(objs[0], namer, floor, wall, rng)
    plans = [_plan_list_with_relation, _plan_groups, _plan_pair_focus, _plan_room]
    text = plans[int(rng.integers(len(plans)))](objs, namer, floor, wall, rng)
    if len(text.split()) > MAX_WORDS:
        text = _plan_groups(objs, namer, floor, wall, rng)
    if len(text.split()) > MAX_WORDS:
        text = _plan_compact(objs, floor)
    return text
