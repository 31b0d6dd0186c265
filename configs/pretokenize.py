"""Pre-tokenization config: `fourm-pretokenize --config configs/pretokenize.py[:options]`.

Options (comma-separated): `eval` (held-out scenes from a disjoint index range), `text` (only the
modalities that need no trained image tokenizer: raw rgb + caption/det/metadata), `smoke` (64
scenes, for a quick look), `224` (224 px scenes and 14x14 grids).

Override any field, e.g. `--config.source.count=100000 --config.out_dir=/data/scenes64`, or
point an image modality at another tokenizer: `--config.image_tokenizers.tok_rgb@64=DIR` (a
training workdir of `fourm-train-tokenizer` or an exported tokenizer folder).
"""

import ml_collections

from fourm.config import common_config


def get_config(arg=None):
  opts = {o.strip() for o in (arg or "").split(",") if o.strip()}
  unknown = opts - {"eval", "text", "smoke", "224"}
  if unknown:
    raise ValueError(f"configs/pretokenize.py: unknown options {sorted(unknown)}; "
                     f"use eval, text, smoke, 224")
  c = common_config()
  res = 224 if "224" in opts else c.resolution

  # Where samples come from: kind = scenes | folder | tfds.
  c.source = ml_collections.ConfigDict(dict(
      kind="scenes",
      seed=c.seed,  # scene-generator seed
      # Train scenes [0, count); held-out scenes start far away so the ranges never meet.
      start=1_000_000 if "eval" in opts else 0,
      count=256 if "eval" in opts else 8192,  # folder: -1 = all samples from `start`
      resolution=res,
      folder="",  # aligned-folder root (kind=folder)
      tfds_dir="", tfds_split="train",  # kind=tfds: a prepared dataset (.../<name>/<version>)
  ))
  if "smoke" in opts:
    c.source.count = 64

  tok_mods = [f"tok_rgb@{res}", f"tok_depth@{res}", f"tok_normal@{res}", f"tok_semseg@{res}"]
  c.modalities = [f"rgb@{res}"] + ([] if "text" in opts else tok_mods) + ["caption", "det", "metadata"]
  # Modality -> tokenizer directory (the default workdirs of the tokenizer recipes).
  c.image_tokenizers = ml_collections.ConfigDict(
      {} if "text" in opts else {m: f"runs/tokenizers/{m}" for m in tok_mods})
  c.text_tokenizer = "runs/tokenizers/text"  # fourm-train-text-tokenizer's output

  split = "eval" if "eval" in opts else "train"
  c.out_dir = f"runs/pretok/scenes{res}{'_text' if 'text' in opts else ''}_{split}"
  c.shard_size = 1024  # samples per ArrayRecord shard (the unit of resumption)
  c.batch_size = 64  # image tokenizer batch (one jit compilation)
  c.workers = c.num_workers  # sample-generation processes (0 = in the main process)
  # Metadata fields unknown to fourm.tokenizers.structure.METADATA_SPEC: error (True) or dropped.
  c.strict_metadata = True
  c.overwrite = False  # True: discard shards of a previous, different run in out_dir
  # Multi-modal augmentation before tokenization (fourm.data.augment): one random crop (side a
  # fraction in `crop` of the image, resized back) and a left-right flip with probability `hflip`,
  # applied consistently to every field of a sample (normals' x negated, boxes and intrinsics
  # moved); deterministic in (seed, sample index). Off by default.
  c.augment = ml_collections.ConfigDict(dict(enabled=False, seed=0, hflip=0.5, crop=(0.8, 1.0),
                                             flip_text=True))
  return c
