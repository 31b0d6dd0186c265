"""Tokenizer throughput: image-like VQ tokenizers (encode / decode) and the text tokenizer.

    python -m fourm.bench.tokenizer                          # rgb + depth at 64 and 224 px, text
    python -m fourm.bench.tokenizer --recipes depth --resolutions 224 --batch 64

Image tokenizers are built from the repository's recipes (tokenizers/<modality>.py:<resolution>,
the sizes real runs train) with random weights: speed does not depend on what the weights learned.
Inputs are procedural scenes (fourm.data.scenes) tiled to the batch, so the codecs see realistic
values (no invalid-pixel warnings). Calls go through `ImageTokenizer.encode/decode`, i.e. the
input checks and the host<->device transfer are included, as pre-tokenization pays them.
FLOPs per call are XLA's cost analysis of the jitted encode / decode (no loops inside).

The text tokenizer is trained (SentencePiece, the registry's vocabulary) on scene captions, then
encodes and decodes captions one at a time, as pre-tokenization and generation call it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from fourm.bench.common import Result, peak_rss_bytes, reset_peak_rss, time_calls, xla_flops

RECIPE_FIELDS = {"rgb": "rgb", "depth": "depth", "normals": "normals", "semseg": "semseg"}


def _scene_inputs(field: str, resolution: int, batch: int, distinct: int = 4) -> np.ndarray:
    from fourm.data.scenes import generate_scene

    imgs = [generate_scene(0, i, resolution)[field] for i in range(min(distinct, batch))]
    return np.stack([imgs[i % len(imgs)] for i in range(batch)])


def random_image_tokenizer(recipe: str, resolution: int, *, tiny: bool = False, seed: int = 0):
    """An `ImageTokenizer` of recipe tokenizers/<recipe>.py at `resolution`, random weights."""
    from flax import nnx

    from fourm.config import REPO_ROOT, load_config
    from fourm.tokenizers.image import WEIGHTS, ImageTokenizer, build_model

    path = REPO_ROOT / "tokenizers" / f"{recipe}.py"
    if recipe not in RECIPE_FIELDS or not path.exists():
        raise ValueError(f"unknown tokenizer recipe {recipe!r}; known: {sorted(RECIPE_FIELDS)} "
                         f"(files in {REPO_ROOT / 'tokenizers'})")
    cfg = load_config(f"{path}:{resolution}{',tiny' if tiny else ''}")
    _, model = build_model(cfg, seed)
    _, weights, _ = nnx.split(model, WEIGHTS, ...)
    return ImageTokenizer(cfg, weights, chunk_size=1 << 30)  # one chunk: the batch is the call


def bench_image_tokenizer(recipe: str, resolution: int, batch: int = 32, iters: int = 5, *,
                          tiny: bool = False) -> list[Result]:
    """encode and decode of one batch: images/s, FLOPs, peak RSS."""
    import jax

    tok = random_image_tokenizer(recipe, resolution, tiny=tiny)
    x = _scene_inputs(RECIPE_FIELDS[recipe], resolution, batch)
    ids = tok.encode(x)
    out = []
    base = f"tokenizer.{recipe}@{resolution}" + (".tiny" if tiny else "")
    for op, fn, arg, pure in (("encode", tok.encode, x, tok._encode), ("decode", tok.decode, ids, tok._decode)):
        reset_peak_rss()
        t = time_calls(lambda: fn(arg), iters)
        flops = xla_flops(pure, tok.weights, jax.numpy.asarray(arg))
        out.append(Result(f"{base}.{op}", t.median_s, batch / t.median_s, "images/s", peak_rss=peak_rss_bytes(),
                          flops=flops, first_s=t.first_s, cpu_s=t.cpu_s,
                          extra=dict(batch=batch, grid=list(tok.grid), vocab=tok.vocab_size,
                                     channels=list(tok.cfg.model.channels))))
    return out


def bench_text_tokenizer(num_captions: int = 2000, train_captions: int = 300) -> list[Result]:
    """Text encode / decode, one caption per call as pipelines use it: captions/s."""
    from fourm import modalities as modreg
    from fourm.data.scenes import generate_scene
    from fourm.tokenizers.text import TextTokenizer

    captions = [generate_scene(1, i, 32)["caption"] for i in range(train_captions)]
    tok = TextTokenizer.train(captions, None, dict(vocab_size=modreg.TEXT_VOCAB))
    texts = [captions[i % len(captions)] for i in range(num_captions)]
    encoded = [tok.encode(s) for s in texts]
    n_tokens = sum(len(e) for e in encoded)
    out = []
    for op, fn, items in (("encode", tok.encode, texts), ("decode", tok.decode, encoded)):
        reset_peak_rss()
        t = time_calls(lambda: [fn(s) for s in items], iters=3)
        out.append(Result(f"tokenizer.text.{op}", t.median_s, num_captions / t.median_s, "captions/s",
                          peak_rss=peak_rss_bytes(), first_s=t.first_s, cpu_s=t.cpu_s,
                          extra=dict(captions=num_captions, tokens=n_tokens,
                                     tokens_per_s=n_tokens / t.median_s, vocab=tok.vocab_size)))
    return out


def run(recipes: Sequence[str] = ("rgb", "depth"), resolutions: Sequence[int] = (64, 224), batch: int = 32,
        iters: int = 5, num_captions: int = 2000, tiny: bool = False, text: bool = True) -> list[Result]:
    results = []
    for res in resolutions:
        for recipe in recipes:
            results += bench_image_tokenizer(recipe, int(res), batch, iters, tiny=tiny)
    if text:
        results += bench_text_tokenizer(num_captions)
    return results


def main(argv):
    del argv
    from absl import flags

    from fourm.bench.common import format_table

    f = flags.FLAGS
    results = run(f.recipes, [int(r) for r in f.resolutions], f.batch, f.iters, f.captions, f.tiny)
    print(format_table(results))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import app, flags

    flags.DEFINE_list("recipes", ["rgb", "depth"], "tokenizer recipes (tokenizers/<name>.py)")
    flags.DEFINE_list("resolutions", ["64", "224"], "image sides")
    flags.DEFINE_integer("batch", 32, "images per call")
    flags.DEFINE_integer("iters", 5, "timed calls")
    flags.DEFINE_integer("captions", 2000, "captions per text call")
    flags.DEFINE_boolean("tiny", False, "the recipes' tiny (smoke-test) models")
    app.run(main)
