"""The quickstart: scenes -> tokenizers -> pre-tokenize -> pretrain -> generate -> report.

`fourm-quickstart` runs the default profile; `--config quickstart:smoke` runs a small one in a few
minutes (exercised by the test suite). Every stage is cached in `workdir/<stage>/DONE.json`:
running again skips finished stages, and a killed run resumes inside the stage that was running
(tokenizer and model trainings resume from their checkpoints; pre-tokenization skips shards).
"""

import ml_collections

from fourm.config import common_config


def get_config(arg=None):
  profile = arg or "default"
  if profile not in ("default", "smoke"):
    raise ValueError(f"quickstart profile must be 'default' or 'smoke', got {profile!r}")
  smoke = profile == "smoke"
  c = common_config()
  c.profile = profile
  c.workdir = f"runs/quickstart{'_smoke' if smoke else ''}"
  c.resolution = 64
  c.num_devices = 8  # simulated CPU devices for the sharded stages
  # Scenes: train [0, train_scenes), held-out from heldout_start.
  c.train_scenes = 256 if smoke else 4096
  c.heldout_scenes = 16 if smoke else 64
  c.heldout_start = 1_000_000
  # Tokenizers: training steps per image modality, and the recipes' options.
  c.tokenizer_steps = 30 if smoke else 250  # the recipes train 1500 (issue figures)
  c.tokenizer_recipe_opts = "64,tiny" if smoke else "64"
  c.text_vocab = 4096
  # Pretraining (configs/pretrain.py variant) and its length.
  c.pretrain_variant = "smoke" if smoke else "quickstart"
  c.pretrain_steps = 40 if smoke else 600
  c.pretrain_batch = 16 if smoke else 32
  # Generation on held-out scenes.
  c.num_generate = 4 if smoke else 8
  c.maskgit_steps = 4 if smoke else 8
  c.caption_tokens = 24 if smoke else 48
  # Held-out scenes (after the evaluated ones) on which the caption -> RGB checker is validated.
  c.checker_scenes = 50 if smoke else 300
  return c
