"""RGB tokenizer recipe: uint8 images, MSE reconstruction, cosine VQ (1024 codes).

`--config tokenizers/rgb.py:64` (64 px -> 8x8 tokens, the quickstart) or `:224` (14x14, as 4M);
add `,fsq` for an FSQ quantizer or `,tiny` for a smoke-test model.
"""

from fourm.tokenizers.recipes import base_config


def get_config(arg=None):
  c = base_config("rgb", "tok_rgb", dict(kind="image", channels=3, l2_weight=1.0, l1_weight=0.1),
                  arg)
  return c
