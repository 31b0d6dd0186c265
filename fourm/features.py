"""Encoder features of a fourm or official 4M checkpoint (what 4M's FMViT returns), and image
retrieval by the global embeddings a 4M-21 model predicts.

    model = load_model("4M-21_B_CC12M/")                       # official 4M folder or fourm export
    f = encoder_features(model, {"rgb@224": images})           # uint8 / [0, 1] [B, H, W, 3]
    f.tokens   # (B, N, D) encoder output (after encoder_norm) per input token
    f.pooled   # (B, D) mean over the valid tokens
    f.of("rgb@224")                                            # (B, 196, D) one input's tokens

    gen = Generator(model, tokenizers)                          # + the global tokenizer folder
    q = predicted_global(gen, {"rgb@224": query}, "tok_dinov2_global")      # (Bq, C)
    g = predicted_global(gen, {"rgb@224": gallery}, "tok_dinov2_global")    # (Bg, C)
    index, score = retrieve(q, g, k=5)                          # cosine similarity, best first

4M's FMViT is its encoder used as an RGB ViT: patches -> linear projection + sin-cos position +
modality embedding -> encoder blocks -> encoder_norm, returned per patch (its output head is the
identity). `encoder_features(model, {"rgb@224": x})` computes exactly that with the loaded
weights. Other inputs (token grids of other modalities, text) join the same encoder sequence, as
4M's encoder takes them; their tokens follow in the model's modality order (`Features.slices`).
Inputs are what `fourm.generate` takes as conditions (images, token ids, native arrays or text
through the given tokenizers), all of them fully given.

Retrieval follows 4M-21: the model predicts `tok_dinov2_global` / `tok_imagebind_global` tokens
from the inputs (4M's RGB -> X preset: ROAR, 1 step, temperature 0.01, CFG 2), the global
tokenizer (`4M_tokenizers_DINOv2-B14-global_*`) decodes them into the feature vector, and
retrieval ranks a gallery by cosine similarity to the query's vector.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fourm.compat import ml4m_assets
from fourm.generate.chain import Generator, Target
from fourm.generate.inputs import GenerationInputError, condition_slots

GLOBAL_MODALITIES = ("tok_dinov2_global", "tok_imagebind_global")


@dataclasses.dataclass
class Features:
    tokens: np.ndarray  # (B, N, D) encoder output per input slot (0 where not valid)
    valid: np.ndarray  # (B, N) bool
    pooled: np.ndarray  # (B, D) mean over the valid slots
    slices: dict[str, tuple[int, int]]  # input modality -> its [start, stop) along N

    def of(self, name: str) -> np.ndarray:
        if name not in self.slices:
            raise KeyError(f"no input {name!r} in these features; inputs: {list(self.slices)}")
        a, b = self.slices[name]
        return self.tokens[:, a:b]


def encoder_inputs(model, inputs: Mapping[str, Any], tokenizers: Mapping[str, Any] | None = None):
    """(`fourm.batch` encoder arrays, slices) with every given token of `inputs` as a slot."""
    if not inputs:
        raise GenerationInputError("no inputs given")
    gen = Generator(model, tokenizers, resize=True)  # its input handling: one place for all kinds
    states, batch = gen.prepare(dict(inputs), None, [])
    spec = model.spec
    names = [n for n in spec.names if n in states]  # the model's order, as condition_slots lays out
    arrays = condition_slots(spec, states, names, [frozenset()], batch)
    slices, start = {}, 0
    for n in names:
        width = states[n].known.shape[1]
        slices[n] = (start, start + width)
        start += width
    return arrays, slices


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, arrays):
    model = nnx.merge(graphdef, state)
    enc = model.encode(arrays)
    valid = arrays["enc_valid"].astype(bool)
    feats = jnp.where(valid[..., None], enc.features.astype(jnp.float32), 0.0)
    pooled = feats.sum(1) / jnp.maximum(valid.sum(1, keepdims=True), 1).astype(jnp.float32)
    return feats, pooled


def encoder_features(model, inputs: Mapping[str, Any], tokenizers: Mapping[str, Any] | None = None) -> Features:
    """Encoder features of `inputs` ({modality: value}); see the module docstring."""
    arrays, slices = encoder_inputs(model, inputs, tokenizers)
    graphdef, state = nnx.split(model)
    feats, pooled = _encode(graphdef, state, {k: jnp.asarray(v) for k, v in arrays.items()})
    return Features(np.asarray(feats), np.asarray(arrays["enc_valid"], bool), np.asarray(pooled), slices)


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
