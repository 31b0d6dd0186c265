"""Depth tokenizer recipe: metres -> log-depth in a fixed range -> cosine VQ (1024 codes).

Tokens see log(depth) mapped from [log min_depth, log max_depth] to [-1, 1] (fixed, so tokens
decode to metres); the loss adds a per-image robustly normalised term; NaN/inf/<=0 are masked.
`--config tokenizers/depth.py:64` (8x8 tokens) or `:224` (14x14); `,fsq`, `,tiny` as for rgb.
"""

from fourm.tokenizers.recipes import base_config


def get_config(arg=None):
  # The scene generator's rooms put every pixel between ~1 and ~9 m; [0.5, 20] m leaves margin
  # while keeping log-depth resolution (a narrower range = finer steps per token code).
  c = base_config("depth", "tok_depth",
                  dict(kind="depth", min_depth=0.5, max_depth=20.0, ssi_weight=0.5), arg)
  return c
