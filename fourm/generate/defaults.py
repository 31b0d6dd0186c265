"""fourm's one default sampling setting, shared by `fourm-generate` (configs/generate.py), the
quickstart and the notebooks, so the same checkpoint gives the same answer from each.

Default: greedy decoding (temperature 0) for image-like targets and for sequences. A token grid
is decoded in one step when RGB is among the conditions (`GRID_GIVEN_RGB`: 4M's own advice for
RGB -> X, its DEFAULTS_RGB2X decode in one step) and with MaskGIT, 8 steps, cosine schedule
otherwise (`GRID`: generating an image from a caption needs the steps). On the quickstart's
model the one-step decode is the better one for every RGB -> X task (1500 steps: depth AbsRel
0.140 vs 0.157, normals 14.7 vs 15.4 deg, mIoU 0.41 vs 0.40). Greedy is reproducible and is what
the quickstart's quality figures measure; raise `temperature` (e.g.
`--targets depth:temperature=0.5`) for varied samples. The Python `Target` dataclass keeps 4M's
own default (temperature 1) for code written against 4M.
"""

from __future__ import annotations

from fourm.generate.chain import Target

GRID = dict(
    scheme="maskgit",  # maskgit | roar
    steps=8,
    token_schedule="cosine",  # cosine | linear | constant (then steps = tokens per step)
    temperature=0.0,  # 0 = greedy
    temperature_schedule="constant",  # constant | linear | cosine | onex:<min>:<power>
    top_k=0,  # 0 = off
    top_p=1.0,  # nucleus mass in (0, 1]; 1 = off
    guidance_scale=1.0,  # classifier-free guidance (1 = off)
    guidance_schedule="constant",
    choice_temperature=0.0)
GRID_GIVEN_RGB = dict(GRID, steps=1)
TEXT = dict(
    temperature=0.0, temperature_schedule="constant", top_k=0, top_p=1.0,
    guidance_scale=1.0, guidance_schedule="constant",
    max_new_tokens=0)  # 0 = the modality's maximum length - 1


def grid_target(name: str, rgb_given: bool = False, **overrides) -> Target:
    """A `Target` for an image-like modality with the default sampling (overrides win);
    `rgb_given`: RGB is among the conditions (one-step decode, `GRID_GIVEN_RGB`)."""
    kw = dict(GRID_GIVEN_RGB if rgb_given else GRID, **overrides)
    kw["top_p"] = None if float(kw["top_p"]) == 1.0 else float(kw["top_p"])
    return Target(name, **kw)


def text_target(name: str, **overrides) -> Target:
    """A `Target` for a sequence modality with the default sampling (overrides win)."""
    kw = dict(TEXT, **overrides)
    kw["top_p"] = None if float(kw["top_p"]) == 1.0 else float(kw["top_p"])
    kw["max_new_tokens"] = int(kw["max_new_tokens"]) or None
    return Target(name, **kw)
