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
  # CPU devices XLA exposes (set before JAX starts). The real count (1) is the fastest on a CPU:
  # 60 steps of the quickstart model took 33 s on 1 device and 57 s on 8 simulated ones (compile
  # included, run back to back; 2 devices: no faster than 1), whose all-reduces and per-device
  # programs share the same 2 cores; tests/test_sharding.py proves 8 give the same result. The
  # smoke profile keeps a 2-device mesh so the end-to-end test runs sharded.
  c.num_devices = 2 if smoke else 1
  # Scenes: train [0, train_scenes), held-out from heldout_start.
  c.train_scenes = 256 if smoke else 8192
  c.heldout_scenes = 16 if smoke else 64
  c.heldout_start = 1_000_000
  # Tokenizers: training steps per recipe (the recipes' own default is 1500). Depth, normals and
  # segmentation reach their ceilings' plateau early (AbsRel 0.04, 6.4 deg, mIoU 0.91 at 250);
  # RGB needs 1000 (PSNR 26.3 dB vs 23.1 at 250): at 250 its round trips lose the object
  # colours, which capped caption -> RGB at 5% colours right before the model was judged.
  c.tokenizer_steps = ml_collections.ConfigDict(
      dict(rgb=30, depth=30, normals=30, semseg=30) if smoke
      else dict(rgb=1000, depth=250, normals=250, semseg=250))
  c.tokenizer_recipe_opts = "64,tiny" if smoke else "64"
  c.text_vocab = 4096
  # Pretraining (configs/pretrain.py variant) and its length.
  c.pretrain_variant = "smoke" if smoke else "quickstart"
  c.pretrain_steps = 40 if smoke else 3000  # ~15 minutes on 2 cores, one device
  c.pretrain_batch = 16 if smoke else 32
  # Generation on held-out scenes.
  c.num_generate = 4 if smoke else 8
  c.maskgit_steps = 4 if smoke else 8  # caption -> RGB (RGB -> X decodes in one step)
  c.caption_tokens = 24 if smoke else 48
  # Held-out scenes (after the evaluated ones) on which the caption -> RGB checker is validated.
  c.checker_scenes = 50 if smoke else 300
  return c
