"""`fourm-generate` / `fourm-generate-eval`: sampler defaults per target kind, outputs, evaluation.

Plain flags of the command (--checkpoint, --tokenizers, --cond, --targets, --out, --seed, --batch)
set what to generate; this config holds the defaults every target starts from. Per target,
`--targets depth:steps=12:temperature=0.5,caption:top_p=0.9` overrides them.
"""

import ml_collections

from fourm.config import common_config
from fourm.generate import defaults, stepwise


def get_config(arg=None):
  del arg
  c = common_config()  # seed, ...
  c.out = "runs/generate"
  c.batch = 1  # samples per condition set (different seeds within the batch)
  c.resize = True  # resize wrong-size images (with a notice); False: error
  # MaskGIT/ROAR loop: auto = buckets (a host loop over jitted step programs at a few bucketed
  # shapes: quick to compile and to run; fourm.generate.stepwise) | scan (one compiled step body
  # at the largest shape) | unrolled (exact shapes per step in one program: slow to compile).
  c.loop = "auto"
  c.buckets = stepwise.DEFAULT_BUCKETS  # step programs per target (more: less padding, more compiling)
  c.kv_cache = True
  # Sampler defaults per target kind: fourm's one default (greedy; fourm.generate.defaults),
  # shared with the quickstart and the notebooks.
  c.grid = ml_collections.ConfigDict(dict(defaults.GRID))  # image-like targets (token grids)
  # ... when RGB is among the conditions (RGB -> depth, normals, segmentation: one step)
  c.grid_given_rgb = ml_collections.ConfigDict(dict(defaults.GRID_GIVEN_RGB))
  c.text = ml_collections.ConfigDict(dict(defaults.TEXT))  # sequences (caption, det, metadata)
  # fourm-generate-eval: held-out procedural scenes against mean baselines.
  c.eval = ml_collections.ConfigDict(dict(
      num=32, start=1_000_000, train_scenes=256, batch_size=8, resolution=64,
      grid_temperature=0.0, text_temperature=0.0,
      loop="auto"))  # many calls of the same shapes: compile once, run the faster form
  return c
