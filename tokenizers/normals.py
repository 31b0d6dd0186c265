"""Surface-normals tokenizer recipe: unit vectors, angular loss on unit-normalised outputs.

`--config tokenizers/normals.py:64` (8x8 tokens) or `:224` (14x14); `,fsq`, `,tiny` as for rgb.
"""

from fourm.tokenizers.recipes import base_config


def get_config(arg=None):
  c = base_config("normals", "tok_normal", dict(kind="normals", l1_weight=0.1), arg)
  return c
