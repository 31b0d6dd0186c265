"""Pretraining config: `--config configs/pretrain.py:<variant>`.

Variants:
  smoke   a very small model on the scene shards, for tests and a quick look (minutes on a CPU);
  quickstart
          the quickstart's default: 192 wide, 4+4 layers, sized so ~15 minutes on 2 CPU cores
          teach it RGB -> depth / normals / segmentation / caption on the scene shards;
  tiny    4M-T (384 wide, 6+6 layers) on the scene shards at 64 px (the CPU benchmark);
  base | large | xlarge
          4M-B / 4M-L / 4M-XL with the 4M-7 modalities (ml4m family, 224 px, 14x14 grids), global
          batch 8192, 128 input + 128 target tokens, bf16, FSDP over the whole slice: the AOT check
          (`fourm-aot --config configs/pretrain.py:base --topology v5p-128`) and pod runs.

Set the data with `--config.data.dir=PATH` (pre-tokenized shards from fourm.tokenizers.pretokenize).
"""

import ml_collections

from fourm import masking
from fourm.config import common_config
from fourm.model.sizes import model_config

SCENE_MODALITIES = ["rgb@64", "tok_rgb@64", "tok_depth@64", "tok_normal@64", "tok_semseg@64",
                    "caption", "det"]


def get_config(arg="tiny"):
  arg = arg or "tiny"
  c = common_config()
  c.variant = arg
  c.workdir = f"runs/pretrain_{arg}"

  # ---- data: pre-tokenized ArrayRecord shards + the masking transform ----
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # required: a pretokenize output folder (manifest.json + *.array_record)
  c.data.eval_dir = ""  # held-out shards; "" = evaluate on fixed batches of data.dir (seed + 1)
  c.data.num_workers = 0  # grain worker processes (0 = threads in the trainer process)
  c.data.num_threads = 2
  c.data.prefetch = 4
  # sha256 of every shard against the manifest before the first step (fourm.data.shards); False
  # skips it for data verified elsewhere (its cost: `fourm-bench --only integrity`).
  c.data.verify_shards = True
  c.data.vocab_from_manifest = True  # model vocabularies = the tokenizers' (manifest) sizes
  # Expected tokenizer versions/hashes per modality ({} = accept the manifest's); a mismatch is
  # an error before any compute, so a model never trains on tokens of another tokenizer.
  c.data.tokenizers = ml_collections.ConfigDict()
  c.masking = masking.default_config()

  # ---- model ----
  c.model = model_config("tiny", "swiglu")
  c.model.modalities = list(SCENE_MODALITIES)

  # ---- initialisation (fine-tuning; fourm.train.finetune): "" = from scratch, else a fourm export
  # or an official 4M folder. Parameters the checkpoint lacks start fresh (named in the log).
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""
  c.init.freeze = ()  # parameter-name globs kept as loaded, e.g. ("encoder/*", "enc_embed/*")
  c.init.new_lr = 0.0  # peak lr of the parameters the checkpoint lacks (0 = optim.lr)

  # ---- optimisation (4M: AdamW 0.9/0.95, wd 0.05, warmup + cosine) ----
  c.batch_size = 64  # global, over all processes
  c.grad_accum = 1  # micro-batches per step (batch_size / grad_accum each)
  c.num_train_steps = 2000
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr=1e-6, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      clip_grad=3.0))
  c.nonfinite = "stop"  # NaN/Inf loss or gradients: stop | skip (the step is not applied)

  # ---- logging, evals, checkpoints ----
  c.log_every = 10
  c.eval_every = 200  # 0 = never
  c.eval_batches = 4
  c.ckpt_every = 200
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  # Steps the loop may run ahead of the newest checkpoint while it is still being written: at
  # that step boundary it waits for the write to finish (the save is durable). 1 = the write
  # overlaps one step, so a kill loses at most ckpt_every steps; -1 = never wait (fully async).
  c.ckpt_durable_within_steps = 1

  if arg == "smoke":
    c.model.update(dim=64, encoder_depth=2, decoder_depth=2, num_heads=2)
    c.model.modalities = ["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]
    c.masking.input_budget = 32
    c.masking.target_budget = 32
    c.batch_size = 16
    c.num_train_steps = 60
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.log_every = 5
    c.eval_every = 30
    c.eval_batches = 2
    c.ckpt_every = 30
  elif arg == "quickstart":
    # Compute-bound on a 2-core CPU: a narrower, shallower model sees ~3x more samples in the
    # same minutes than 4M-T would, which is what matters in a budget this small.
    c.model.update(dim=192, encoder_depth=4, decoder_depth=4, num_heads=3)
    # 4M's mixture plus "from the caption alone" (what caption -> RGB asks at test time), with
    # RGB -> all weighted twice: the quickstart reports four RGB -> X tasks. Against the plain
    # all2all,rgb2all mixture at 1500 steps: caption object count 45% vs 33%, colour precision 90%
    # vs 77%, depth / segmentation equal, normals 15.9 vs 14.7 deg.
    c.masking.mixture = "all2all,rgb2all,caption2all"
    c.masking.weights = (1.0, 2.0, 1.0)
    c.batch_size = 32
    c.num_train_steps = 3000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = 2
    c.ckpt_every = 100
  elif arg == "tiny":
    pass
  elif arg in ("base", "large", "xlarge"):
    c.model = model_config(arg, "swiglu")
    c.model.family = "ml4m"
    from fourm.modalities import ML4M_7
    c.model.modalities = list(ML4M_7)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.masking.input_budget = 128
    c.masking.target_budget = 128
    c.batch_size = 8192
    c.num_train_steps = 195_000
    c.optim.lr = 1e-4 * c.batch_size / 256  # 4M: blr 1e-4 scaled by batch / 256
    c.optim.warmup_steps = 10_000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.eval_every = 5000
    c.ckpt_every = 1000
  else:
    raise ValueError(f"unknown pretrain variant {arg!r}; known: smoke, quickstart, tiny, base, large, xlarge")
  return c
