"""fourm's one default sampling setting, shared by `fourm-generate` (configs/generate.py), the
quickstart and the notebooks, so the same checkpoint gives the same answer from each.

Default: greedy decoding (temperature 0) for image-like targets (MaskGIT, 8 steps, cosine token
schedule) and for sequences. Greedy is reproducible and is what the quickstart's quality figures
measure; raise `temperature` (e.g. `--targets depth:temperature=0.5`) for varied samples. The
Python `Target` dataclass keeps 4M's own default (temperature 1) for code written against 4M.
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
TEXT = dict(
    temperature=0.0, temperature_schedule="constant", top_k=0, top_p=1.0,
    guidance_scale=1.0, guidance_schedule="constant",
    max_new_tokens=0)  # 0 = the modality's maximum length - 1


def grid_target(name: str, **overrides) -> Target:
    """A `Target` for an image-like modality with the default sampling (overrides win)."""
    kw = dict(GRID, **overrides)
    kw["top_p"] = None if float(kw["top_p"]) == 1.0 else float(kw["top_p"])
    return Target(name, **kw)


def text_target(name: str, **overrides) -> Target:
    """A `Target` for a sequence modality with the default sampling (overrides win)."""
    kw = dict(TEXT, **overrides)
    kw["top_p"] = None if float(kw["top_p"]) == 1.0 else float(kw["top_p"])
    kw["max_new_tokens"] = int(kw["max_new_tokens"]) or None
    return Target(name, **kw)
