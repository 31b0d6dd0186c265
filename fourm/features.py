"""Encoder features of a fourm or official 4M checkpoint (what 4M's FMViT returns), and image
retrieval by the global embeddings a 4M-21 model predicts.

    model = backbone.load("4M-21_B_CC12M/")                    # official 4M folder or fourm export
    f = encoder_features(model, {"rgb@224": images})           # uint8 / [0, 1] [B, H, W, 3]
    f.tokens   # (B, N, D) encoder output (after encoder_norm) per input token
    f.pooled   # (B, D) mean over the valid tokens
    f.of(model.spec, "rgb@224")                                # (B, 196, D) one input's tokens

    gen = Generator(model, tokenizers)                          # + the global tokenizer folder
    q = predicted_global(gen, {"rgb@224": query}, "tok_dinov2_global")      # (Bq, C)
    g = predicted_global(gen, {"rgb@224": gallery}, "tok_dinov2_global")    # (Bg, C)
    index, score = retrieve(q, g, k=5)                          # cosine similarity, best first

4M's FMViT is its encoder used as an RGB ViT: patches -> linear projection + sin-cos position +
modality embedding -> encoder blocks -> encoder_norm, returned per patch (its output head is the
identity). `encoder_features(model, {"rgb@224": x})` computes exactly that with the loaded
weights. Other inputs (token grids of other modalities, text) join the same encoder sequence, as
4M's encoder takes them, in the model's modality order (`slices`).

The features are `fourm.backbone`'s (`Features`, `features_of_batch`; its `encode_features` takes
pixels and token ids). What this module adds: any input `fourm.generate` takes as a condition
(images of any size, native depth / normals / segmentation through their tokenizers, text through
the text tokenizer), a compiled forward, and retrieval.

Retrieval follows 4M-21: the model predicts `tok_dinov2_global` / `tok_imagebind_global` tokens
from the inputs (4M's RGB -> X preset: ROAR, 1 step, temperature 0.01, CFG 2), the global
tokenizer (`4M_tokenizers_DINOv2-B14-global_*`) decodes them into the feature vector, and
retrieval ranks a gallery by cosine similarity to the query's vector.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fourm import backbone
from fourm.backbone import Features
from fourm.compat import ml4m_assets
from fourm.generate.chain import Generator, Target
from fourm.generate.inputs import GenerationInputError, condition_slots

GLOBAL_MODALITIES = ("tok_dinov2_global", "tok_imagebind_global")


def encoder_inputs(model, inputs: Mapping[str, Any], tokenizers: Mapping[str, Any] | None = None):
    """`fourm.batch` encoder arrays with every given token of `inputs` as a slot."""
    if not inputs:
        raise GenerationInputError("no inputs given")
    gen = Generator(model, tokenizers, resize=True)  # its input handling: one place for all kinds
    states, batch = gen.prepare(dict(inputs), None, [])
    spec = model.spec
    names = [n for n in spec.names if n in states]  # the model's order, as condition_slots lays out
    return condition_slots(spec, states, names, [frozenset()], batch)


@functools.partial(jax.jit, static_argnums=0)
def _tokens_pooled(graphdef, state, batch):
    f = backbone.features_of_batch(nnx.merge(graphdef, state), batch)
    return f.tokens, f.pooled


def encoder_features(model, inputs: Mapping[str, Any], tokenizers: Mapping[str, Any] | None = None) -> Features:
    """`fourm.backbone.Features` of `inputs` ({modality: value}); see the module docstring."""
    batch = {k: jnp.asarray(v) for k, v in encoder_inputs(model, inputs, tokenizers).items()}
    tokens, pooled = _tokens_pooled(*nnx.split(model), batch)
    return Features(tokens, batch["enc_valid"].astype(bool), batch["enc_mod"], batch["enc_pos"], pooled)


def slices(spec, f: Features) -> dict[str, tuple[int, int]]:
    """Input modality -> its [start, stop) along the token axis (each input's slots are contiguous)."""
    mod = np.asarray(f.modality[0])
    out = {}
    for i in dict.fromkeys(mod.tolist()):
        where = np.flatnonzero(mod == i)
        out[spec.modalities[i].name] = (int(where[0]), int(where[-1]) + 1)
    return out


def global_modality(spec, name: str) -> str:
    """The model's global-embedding output for `name` (dinov2_global, tok_imagebind_global, ...)."""
    full = name if name.startswith("tok_") else f"tok_{name}"
    have = [m for m in GLOBAL_MODALITIES if m in spec.domains_out]
    if full not in GLOBAL_MODALITIES:
        raise GenerationInputError(f"retrieval by {name!r}: expected one of {list(GLOBAL_MODALITIES)}")
    if full not in spec.domains_out:
        raise GenerationInputError(
            f"this model does not predict {full!r} (its outputs are {list(spec.domains_out)}); retrieval by "
            f"global tokens needs a model with {' or '.join(GLOBAL_MODALITIES)} (4M-21)"
            + (f"; this one has {have}" if have else ""))
    return full


def predicted_global(gen: Generator, inputs: Mapping[str, Any], name: str = "tok_dinov2_global", *,
                     preset: str = "rgb2x", seed: int = 0, **target_kw) -> np.ndarray:
    """(B, C) global embeddings: the model's predicted global tokens, decoded by their tokenizer."""
    full = global_modality(gen.spec, name)
    if full not in gen.image_tokenizers:
        raise GenerationInputError(f"retrieval by {full!r} needs its tokenizer (4M_tokenizers_"
                                   f"{'DINOv2-B14' if 'dinov2' in full else 'ImageBind-H14'}-global_*) to decode "
                                   "the predicted tokens into the embedding")
    settings = dict(ml4m_assets.preset_settings(preset, gen.spec.modality(full)), **target_kw)
    settings["top_p"] = None if float(settings.get("top_p") or 1.0) == 1.0 else float(settings["top_p"])
    out = gen.generate(dict(inputs), [Target(full, **settings)], seed=seed)
    dec = np.asarray(out.decoded[full], np.float32)
    return dec.reshape(dec.shape[0], -1)


def retrieve(query, gallery, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(indices (Q, k), cosine similarities (Q, k)) of the k gallery rows closest to each query row."""
    q, g = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"retrieve: expected query (Q, C) and gallery (G, C), got {list(q.shape)} and {list(g.shape)}")
    if not 1 <= k:
        raise ValueError(f"retrieve: k={k}, expected >= 1")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    sim = q @ g.T
    k = min(k, g.shape[0])
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)
