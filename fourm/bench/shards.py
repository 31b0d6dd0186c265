"""Pre-tokenized scene shards in seconds, for trainer tests and benchmarks.

Real runs tokenize with the trained VQ tokenizers (fourm.tokenizers). Those take minutes to train,
so tests and the training benchmark use *patch quantizers* instead: each 8x8-pixel patch becomes
one token from a simple statistic (mean colour, mean log-depth, mean normal, majority class).
They go through the real `pretokenize` writer and the real text tokenizer, so the shards, the
manifest and everything downstream are exactly what a real run reads; and their tokens are exact
functions of aligned images, so cross-modal prediction is learnable and the loss falls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from fourm import modalities as modreg

DEFAULT_MODALITIES = ("rgb@64", "tok_rgb@64", "tok_depth@64", "caption")


class PatchQuantizer:
    """`encode([B, H, W, ...]) -> int [B, H/p, W/p]`: one token per patch from its statistic."""

    version = "patchquant-1"

    def __init__(self, field: str, patch: int = 8):
        self.field, self.patch = field, int(patch)
        self.name = f"patchquant:{field}"
        self.vocab_size = {"rgb": 64, "depth": 32, "normals": 64, "semseg": 8}[field]
        self.config_hash = hashlib.sha256(f"{self.name}/{patch}/{self.vocab_size}".encode()).hexdigest()[:16]

    def _patch_mean(self, x: np.ndarray) -> np.ndarray:
        b, h, w = x.shape[:3]
        p = self.patch
        return x.reshape(b, h // p, p, w // p, p, *x.shape[3:]).mean(axis=(2, 4))

    def encode(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch)
        if self.field == "rgb":  # 4 levels per channel
            q = np.clip(self._patch_mean(x.astype(np.float32)) / 64.0, 0, 3).astype(np.int32)
            return q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
        if self.field == "depth":  # 32 log-spaced bins over 0.5 .. 16 m
            d = self._patch_mean(np.log(np.clip(x.astype(np.float32), 0.5, 16.0)))
            return np.clip((d - np.log(0.5)) / np.log(32.0) * 32, 0, 31).astype(np.int32)
        if self.field == "normals":  # 8 x 8 bins of the mean normal's x, y
            n = self._patch_mean(x.astype(np.float32))
            q = np.clip((n[..., :2] + 1) * 4, 0, 7).astype(np.int32)
            return q[..., 0] * 8 + q[..., 1]
        # semseg: the majority class of the patch
        b, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(b, h // p, w // p, -1)
        counts = np.stack([(patches == c).sum(-1) for c in range(self.vocab_size)], -1)
        return counts.argmax(-1).astype(np.int32)


def make_scene_shards(out_dir: str | Path, *, num_scenes: int = 256, seed: int = 0,
                      modalities: Sequence[str] = DEFAULT_MODALITIES, shard_size: int = 64,
                      resolution: int = 64, progress: bool = False) -> dict:
    """Generate scenes, train the text tokenizer on their captions, pre-tokenize; returns the manifest."""
    from fourm.data.scenes import generate_scenes
    from fourm.tokenizers import pretokenize
    from fourm.tokenizers.text import TextTokenizer

    out_dir = Path(out_dir)
    scenes = list(generate_scenes(seed, 0, num_scenes, resolution, progress=progress))
    image_tokenizers = {}
    text = None
    for name in modalities:
        m = modreg.get(name)
        if m.kind == "grid":
            image_tokenizers[name] = PatchQuantizer(m.source, resolution // m.grid[0])
        elif m.kind == "sequence" and text is None:
            text = TextTokenizer.train([s["caption"] for s in scenes], out_dir / "text_tokenizer",
                                       dict(vocab_size=modreg.TEXT_VOCAB))
    return pretokenize.pretokenize(
        scenes, out_dir, modalities=list(modalities), image_tokenizers=image_tokenizers,
        text_tokenizer=text, shard_size=shard_size, batch_size=32, progress=progress,
        source_info=dict(kind="scenes", seed=seed, num=num_scenes, resolution=resolution,
                         tokenizers="patch quantizers (fourm.bench.shards)"))
