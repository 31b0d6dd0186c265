"""Semantic-segmentation tokenizer recipe: one-hot classes in, per-pixel cross-entropy out.

`--config tokenizers/semseg.py:64` (8x8 tokens) or `:224` (14x14); `,fsq`, `,tiny` as for rgb.
The class count is the scene generator's (`fourm.data.scenes.NUM_CLASSES`); for your own data
override `--config.codec.num_classes=K`.
"""

from fourm.tokenizers.recipes import base_config


def get_config(arg=None):
  from fourm.data.scenes import NUM_CLASSES

  c = base_config("semseg", "tok_semseg",
                  dict(kind="classes", num_classes=NUM_CLASSES, ignore_index=255,
                       label_smoothing=0.0), arg)
  return c
