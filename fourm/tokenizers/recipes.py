"""Shared defaults of the image-like tokenizer recipes in the repository's `tokenizers/` folder.

A recipe is `tokenizers/<modality>.py` with `get_config(arg)`; `arg` is a comma-separated list of
options: a resolution (`64`, `224`), a quantizer (`vq`, `fsq`) and/or `tiny` (a minimal model for
tests and smoke runs), e.g. `--config tokenizers/depth.py:64,fsq`.

Config sections: the *tokenizer* fields (`TOKENIZER_KEYS`: what the weights depend on; hashed into
`config_hash` and copied into exports) and the *run* fields (`train`, `data`, `workdir`, `seed`).
"""

from __future__ import annotations

import ml_collections

from fourm.config import common_config

# What a checkpoint's weights depend on; everything else (train, data, workdir) may change freely.
TOKENIZER_KEYS = ("modality", "name", "resolution", "grid", "codec", "model", "quantizer")

# Model channels per stage, token grid and train steps per resolution; each stage halves the
# side. At 64 px, (32, 64, 128) trains at ~0.6 s per batch of 32 on 2 CPU cores, so the default
# 1500 steps are the ~15 CPU-minute budget; (64, 96, 128) reached the same PSNR per step at twice
# the cost in short runs.
_SIZES = {
    32: dict(channels=(32, 64, 128), grid=4, steps=1500),  # small experiments and tests
    64: dict(channels=(32, 64, 128), grid=8, steps=1500),
    224: dict(channels=(64, 128, 192, 256), grid=14, steps=20000),
}


def parse_arg(arg: str | None) -> dict:
    opts = dict(resolution=64, quantizer=None, tiny=False)
    for tok in (arg or "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.isdigit():
            if int(tok) not in _SIZES:
                raise ValueError(f"tokenizer recipe: resolution {tok} not one of {sorted(_SIZES)}")
            opts["resolution"] = int(tok)
        elif tok in ("vq", "fsq"):
            opts["quantizer"] = tok
        elif tok == "tiny":
            opts["tiny"] = True
        else:
            raise ValueError(f"tokenizer recipe option {tok!r} not understood; use a resolution "
                             f"({sorted(_SIZES)}), 'vq', 'fsq' or 'tiny'")
    return opts


def base_config(modality: str, name: str, codec: dict, arg: str | None = None,
                quantizer: str = "vq") -> ml_collections.ConfigDict:
    """Defaults for one image-like modality; `codec` = the codec section (kind + parameters)."""
    opts = parse_arg(arg)
    res = opts["resolution"]
    size = _SIZES[res]
    c = common_config()
    c.modality = modality  # the data field the tokenizer reads (scene dict key / folder subdir)
    c.name = name  # registry name prefix: tokens are modality f"{name}@{resolution}"
    c.resolution = res
    c.grid = size["grid"]
    c.resize_input = False  # encode() resizes other sizes only when this is True
    c.codec = ml_collections.ConfigDict(codec)
    c.model = ml_collections.ConfigDict(dict(channels=size["channels"], num_res_blocks=1))
    c.quantizer = ml_collections.ConfigDict(dict(
        kind=opts["quantizer"] or quantizer,
        codebook_size=1024,  # the registry's vocabulary for tok_*@64 / @224 (fourm family)
        code_dim=32,
        beta=0.25,  # commitment weight
        ema_decay=0.99,
        restart_threshold=0.05,  # dead = EMA usage < 5% of uniform usage
        levels=(8, 8, 4, 4),  # FSQ: prod = 1024 to match the registry vocabulary
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32, steps=size["steps"], lr=1e-3, warmup_steps=100, end_lr_fraction=0.05,
        b1=0.9, b2=0.99, weight_decay=1e-4, grad_clip=1.0,
        log_every=25, image_every=250, ckpt_every=250, keep_checkpoints=3,
        num_images=8,  # reconstruction rows per PNG
        devices=0,  # data-parallel over every device (0) or the first n (single process)
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="scenes",  # "scenes" (procedural generator) or "folder" (fourm.data.folder layout)
        folder="",  # aligned-folder root when source == "folder"
        seed=0,  # scene-generator seed
        train_start=0, train_num=8192,
        # Held-out scenes come from a disjoint index range of the same generator.
        eval_start=1_000_000, eval_num=512,
        cache_dir="runs/cache/scenes",  # npz cache of generated scenes
    ))
    c.workdir = f"runs/tokenizers/{name}@{res}"
    if opts["tiny"]:
        c.model.channels = tuple(16 for _ in size["channels"])
        c.quantizer.codebook_size = 64
        c.quantizer.code_dim = 8
        c.quantizer.levels = (4, 4, 4)
        c.train.update(batch_size=8, steps=4, log_every=1, image_every=2, ckpt_every=2)
        c.data.update(train_num=32, eval_num=16)
    return c


def tokenizer_section(cfg) -> dict:
    """The tokenizer fields of a full config as a plain JSON-able dict (the hashed part)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    missing = [k for k in TOKENIZER_KEYS if k not in d]
    if missing:
        raise KeyError(f"tokenizer config lacks fields {missing}")
    return _jsonable({k: d[k] for k in TOKENIZER_KEYS})


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
