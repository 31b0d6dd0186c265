"""`fourm-generate` / `fourm-generate-eval`: sampler defaults per target kind, outputs, evaluation.

Plain flags of the command (--checkpoint, --tokenizers, --cond, --targets, --out, --seed, --batch)
set what to generate; this config holds the defaults every target starts from. Per target,
`--targets depth:steps=12:temperature=0.5,caption:top_p=0.9` overrides them.
"""

import ml_collections

from fourm.config import common_config


def get_config(arg=None):
  del arg
  c = common_config()  # seed, ...
  c.out = "runs/generate"
  c.batch = 1  # samples per condition set (different seeds within the batch)
  c.resize = True  # resize wrong-size images (with a notice); False: error
  # MaskGIT/ROAR loop: scan (one compiled step body: quick to compile, best for one-off runs) |
  # unrolled (exact shapes per step: ~1.5x faster per call, ~5x longer to compile) | auto
  # (unrolled when every sample has the same number of known tokens).
  c.loop = "scan"
  c.kv_cache = True
  # Image-like targets (depth, normals, rgb, semseg tokens).
  c.grid = ml_collections.ConfigDict(dict(
      scheme="maskgit",  # maskgit | roar
      steps=8,
      token_schedule="cosine",  # cosine | linear | constant (then steps = tokens per step)
      temperature=0.5,  # 0 = greedy
      temperature_schedule="linear",  # constant | linear | cosine | onex:<min>:<power>
      top_k=0,  # 0 = off
      top_p=1.0,  # nucleus mass in (0, 1]; 1 = off
      guidance_scale=1.0,  # classifier-free guidance (1 = off)
      guidance_schedule="constant",
      choice_temperature=0.0))
  # Sequence targets (caption, det, metadata).
  c.text = ml_collections.ConfigDict(dict(
      temperature=0.3, temperature_schedule="constant", top_k=0, top_p=1.0,
      guidance_scale=1.0, guidance_schedule="constant",
      max_new_tokens=0))  # 0 = the modality's maximum length - 1
  # fourm-generate-eval: held-out procedural scenes against mean baselines.
  c.eval = ml_collections.ConfigDict(dict(
      num=32, start=1_000_000, train_scenes=256, batch_size=8, resolution=64,
      grid_temperature=0.0, text_temperature=0.0,
      loop="auto"))  # many calls of the same shapes: compile once, run the faster form
  return c
