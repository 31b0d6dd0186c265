"""`fourm-bench`: what each benchmark measures and at which sizes.

Variants: the default (the reference shapes of the issue: 4M's batch 8, 128 + 128 tokens,
rgb@224 pixels + tok_rgb@224 + tok_depth@224 + caption with 4M's vocabularies, fp32) and `quick`
(`--quick`, or `--config configs/bench.py:quick`: small shapes for a CI smoke run, same code
paths). Plain flags of the command (--only, --device, --peak_tflops, --iters, --isolate) are
aliases of fields here.
"""

import ml_collections

from fourm.config import common_config

REFERENCE_MODALITIES = ["rgb@224", "tok_rgb@224", "tok_depth@224", "caption"]
QUICK_MODALITIES = ["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"]


def get_config(arg=None):
  quick = arg == "quick"
  if arg not in (None, "", "quick", "gpu"):
    raise ValueError(f"configs/bench.py: variant {arg!r} not known; use 'quick', 'gpu' or nothing")
  c = common_config()
  c.quick = quick
  c.variant = arg or ""
  c.only = ["model", "train", "generate", "tokenizer", "ml4m_tokenizer", "scenes", "pretokenize", "masking",
            "pipeline", "trainer", "integrity", "finetune"]
  c.device = "cpu"  # cpu | gpu (gpu: bf16 compute, MFU against peak_tflops)
  c.dtype = ""  # compute dtype; "" = float32 on cpu, bfloat16 on gpu
  c.peak_tflops = 989.0  # dense bf16 peak of one H100/H200 SXM, for MFU
  c.iters = 2 if quick else 3  # timed calls per figure (median), after one warm-up call
  # Each benchmark group in a fresh process: its own peak RSS and device peak, and no compiled
  # programs or caches left by an earlier group. False = one process (faster; RSS peaks reset).
  c.isolate = not quick

  # PyTorch ml-4m measured in the same run (fourm.bench.reference, docs/benchmarks.md): the
  # interpreter of a scratch venv with torch + ml-4m's dependencies, and an ml-4m work tree.
  # Empty python = no live reference (recorded seconds, marked "recorded", where shapes match).
  c.reference = ml_collections.ConfigDict(dict(
      python="",  # --reference_python
      src="",  # --reference_src
      rounds=5,  # alternating rounds per figure, the order flipped each round (iters calls a side)
      threads=0,  # torch.set_num_threads in the worker (0 = torch's default: the physical cores)
      interop_threads=0,  # torch.set_num_interop_threads (0 = default)
      keep_freed_memory=False,  # the worker gets fourm.hostmem's glibc settings too (page faults)
      timeout_s=1800.0,  # per request (a build or one figure's round)
      worker="",  # another worker script speaking the same protocol (tests); "" = ml-4m's
  ))

  # Model forward / forward+backward (and the train step) at 4M's reference shapes.
  c.model = ml_collections.ConfigDict(dict(
      sizes=["tiny"] if quick else ["tiny", "base"],
      batch=2 if quick else 8,
      input_tokens=32 if quick else 128,
      target_tokens=32 if quick else 128,
      family="fourm" if quick else "ml4m",  # ml4m = 4M's vocabularies (16384 / 8192 / 30000)
      modalities=QUICK_MODALITIES if quick else REFERENCE_MODALITIES,
      # "" = the model's per-backend default (docs/numerics.md); set them to compare.
      head_impl="",  # chunked | dense
      attention_impl="",  # xla | cudnn | jax
      scan_layers=True,
      remat="dots_no_batch",  # the model default
      # >0 replaces the size's depth (encoder and decoder): tests use 1 to compile fast.
      depth=0,
  ))
  # Train step = fwd+bwd + AdamW, donated state, at the model section's shapes, per size.
  c.train = ml_collections.ConfigDict(dict(sizes=["tiny"]))

  # Generation: RGB -> depth (MaskGIT, cosine schedule) -> caption (greedy, KV cache).
  c.generate = ml_collections.ConfigDict(dict(
      sizes=["tiny"],  # the reference also has base (MaskGIT 5.9 s)
      batches=[1] if quick else [1, 8],  # MaskGIT figures per batch size (time per sample too)
      steps=8,
      caption_tokens=4 if quick else 20,
      # MaskGIT loop forms to time: auto (= buckets, fourm.generate.stepwise) | buckets:N (N
      # buckets) | scan | unrolled; names of non-default forms end in .scan / .unrolled /
      # .bucketsN (compare them in one run).
      loops=["auto"],
      buckets=0,  # step programs per target for the bucketed loop (0: fourm's default,
      # fourm.generate.stepwise.DEFAULT_BUCKETS; this config stays free of JAX imports)
  ))

  # Tokenizers: the repository's recipes with random weights, and the text tokenizer.
  c.tokenizer = ml_collections.ConfigDict(dict(
      recipes=["rgb"] if quick else ["rgb", "depth"],
      resolutions=[64] if quick else [64, 224],
      batch=4 if quick else 32,
      captions=200 if quick else 2000,
      tiny=quick,  # the recipes' smoke-test models
  ))

  # 4M's tokenizers in JAX (fourm.compat.ml4m_tokenizers): ViT VQ-VAE encode at the released size
  # (vit_b_enc, 224 px, patch 16); quick: the tiny ViT of the tokenizer fixtures.
  c.ml4m_tokenizer = ml_collections.ConfigDict(dict(
      enc_type="vit_t_enc" if quick else "vit_b_enc",
      image_size=32 if quick else 224,
      patch_size=8 if quick else 16,
      batch=2 if quick else 8,
  ))

  # Scene generator: scenes per second (one process's CPU rate, and wall rate with workers).
  c.scenes = ml_collections.ConfigDict(dict(
      resolutions=[64] if quick else [64, 224],
      workers=[1] if quick else [1, 2],
      num=20 if quick else 400,  # at 64 px; scaled by (64 / R)^2 for larger R, min 40 (10 quick)
  ))

  # Pre-tokenization: scenes -> VQ tokens + text tokens -> ArrayRecord shards.
  c.pretokenize = ml_collections.ConfigDict(dict(
      num=16 if quick else 128,
      resolution=64,
      modalities=["rgb@64", "tok_rgb@64", "tok_depth@64", "caption"],
      # vq: the recipes' VQ tokenizers (random weights) | vq_tiny: their smoke-test models |
      # patch: fourm.bench.shards' patch quantizers (no network)
      tokenizers="vq_tiny" if quick else "vq",
      batch=16 if quick else 32,
  ))

  c.masking = ml_collections.ConfigDict(dict(num=200 if quick else 4000))

  # Input pipeline: shards -> decode -> masking -> batches, as the trainer builds it.
  c.pipeline = ml_collections.ConfigDict(dict(
      num_scenes=32 if quick else 256,
      batch=8 if quick else 64,  # the pretrain config's global batch
      batches=4 if quick else 40,
      num_threads=2,
      num_workers=0,
  ))

  # The real trainer (fourm.bench.train): configs/pretrain.py:<variant> on generated scene shards.
  c.trainer = ml_collections.ConfigDict(dict(
      variant="smoke" if quick else "tiny",
      steps=2 if quick else 5,
      input_batches=3 if quick else 20,
      scenes=64 if quick else 256,
  ))

  # Fine-tuning / backbone vs scratch on held-out scenes (fourm.bench.finetune): model size,
  # pretraining and fine-tuning steps, probe steps.
  c.finetune = ml_collections.ConfigDict(dict(
      dim=32 if quick else 192, depth=1 if quick else 4, heads=2 if quick else 3,
      batch=8 if quick else 32, lr=3e-3 if quick else 2e-3,
      scenes=16 if quick else 2048, heldout_scenes=8 if quick else 128,
      pretrain_steps=2 if quick else 400, finetune_steps=2 if quick else 100,
      probe_scenes=16 if quick else 512, probe_steps=2 if quick else 300))

  # Checkpoint durability window and shard verification cost (fourm.bench.integrity).
  c.integrity = ml_collections.ConfigDict(dict(
      state_mib=8 if quick else 256,  # checkpointed state size
      work=1,  # stand-in step cost (matmul pairs per matrix)
      steps=4 if quick else 20,  # steps run after the save
      scenes=16 if quick else 256,  # scenes in the generated shards
  ))

  # Time to first result (fourm.bench.startup) on a finished quickstart workdir; not in the
  # default list (it needs that workdir): --only startup --config.startup.workdir=runs/quickstart
  c.startup = ml_collections.ConfigDict(dict(workdir="runs/quickstart", rounds=1 if quick else 2))

  # 4M's DiVAE decoder (the released rgb tokenizer's patched UNet, random weights): one image,
  # few-step DDIM vs the 1000-step DDPM default. Run with --only divae (not in the default list).
  c.divae = ml_collections.ConfigDict(dict(
      arch="unet_patched",
      image_size=32 if quick else 224,
      encoder_patch=8 if quick else 16,  # latent grid = image_size / encoder_patch (14 x 14 at 224)
      runs=("ddim:2", "ddpm:2") if quick else ("ddim:25", "ddpm:1000"),
      batch=1,
  ))
  if arg == "gpu":
    gpu_variant(c)
  return c


def gpu_variant(c):
  """`fourm-bench --device gpu` (= --config configs/bench.py:gpu): bf16 with the cuDNN attention
  path (the model's auto choice on GPU), 4M-B and 4M-L train steps at a batch that fills an
  H100/H200 (MFU against config.peak_tflops), MaskGIT + caption on 4M-B, tokenizer encode."""
  c.device = "gpu"
  c.only = ["model", "train", "generate", "tokenizer", "ml4m_tokenizer"]
  c.iters = 5
  c.model.update(sizes=["base", "large"], batch=128, input_tokens=256, target_tokens=256)
  c.train.sizes = ["base", "large"]
  c.generate.update(sizes=["base"], batches=[1, 8])
  c.tokenizer.update(batch=64)
  c.ml4m_tokenizer.update(batch=64)
