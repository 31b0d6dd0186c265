"""The pretrained encoder as a backbone: features per token and pooled, and a task head on top.

    from fourm import backbone
    model = backbone.load("runs/quickstart/pretrain/export")     # or an official 4M folder
    feats = backbone.encode_features(model, {"rgb@64": images})   # uint8 / [0, 1] [B, H, W, 3]
    feats.tokens   # (B, N, D) encoder output per input token (rgb: one per 8x8 patch, raster order)
    feats.pooled   # (B, D) mean over the valid tokens

    head = backbone.TaskHead(model, num_classes=8, per_token=True, rngs=nnx.Rngs(0))
    head = backbone.fit(head, inputs, labels, steps=200, train_encoder=False)   # linear probe
    head = backbone.fit(head, inputs, labels, steps=200, train_encoder=True)    # full fine-tune
    logits = head(backbone.encoder_batch(model.spec, inputs))

Inputs are given per modality like generation conditions (`fourm.generate.inputs`): pixel
images, token grids (int [B, gh, gw] or [B, gh*gw]) or token sequences (int [B, L], 0 = padding).
Every given token is an encoder input; the decoder is not used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fourm.compat import ml4m
from fourm.generate.inputs import GenerationInputError, ModState, condition_slots, pack_sequences, prepare_pixels
from fourm.model.fourm_model import FourM
from fourm.model.pretrained import load_pretrained
from fourm.train.finetune import checkpoint_kind


def load(directory: str | Path, **runtime) -> FourM:
    """A fourm export or an official 4M checkpoint folder (converted on load)."""
    if checkpoint_kind(directory) == "fourm":
        return load_pretrained(directory, runtime or None)
    return ml4m.load(directory, **runtime)


def _state(mod, value) -> ModState:
    if mod.kind == "pixels":
        return prepare_pixels(mod, value, resize=False, notices=[])
    a = np.asarray(value)
    if not np.issubdtype(a.dtype, np.integer):
        raise GenerationInputError(f"input {mod.name!r}: expected token ids (int), got {a.dtype}; "
                                   f"tokenize it first (fourm.tokenizers)")
    if mod.kind == "grid":
        a = a.reshape(a.shape[0], -1)
        if a.shape[1] != mod.num_tokens or (a < 0).any() or (a >= mod.vocab_size).any():
            raise GenerationInputError(f"input {mod.name!r}: expected ids in [0, {mod.vocab_size}) of "
                                       f"shape [B, {mod.grid[0]}, {mod.grid[1]}], got {list(np.shape(value))}")
        return ModState(a.astype(np.int32), np.ones(a.shape, bool))
    return pack_sequences(mod, [[int(t) for t in r if t != 0] for r in a.reshape(a.shape[0], -1)], 0)


def encoder_batch(spec, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`fourm.batch` encoder arrays with every given token of `inputs` as an input slot."""
    unknown = [n for n in inputs if n not in spec.domains_in]
    if unknown:
        raise GenerationInputError(f"inputs {unknown} are not encoder inputs of this model; it takes "
                                   f"{list(spec.domains_in)}")
    states = {n: _state(spec.modality(n), v) for n, v in inputs.items()}
    sizes = {n: s.known.shape[0] for n, s in states.items()}
    if len(set(sizes.values())) != 1:
        raise GenerationInputError(f"inputs have different batch sizes: {sizes}")
    batch = next(iter(sizes.values()))
    return condition_slots(spec, states, list(inputs), [frozenset()], batch)


@dataclasses.dataclass
class Features:
    tokens: jax.Array  # (B, N, D) encoder output (after encoder_norm) per input slot
    valid: jax.Array  # (B, N) bool
    modality: jax.Array  # (B, N) index into spec.modalities
    position: jax.Array  # (B, N) position within the modality (raster index / sequence index)
    pooled: jax.Array  # (B, D) mean over valid slots

    def of(self, spec, name: str) -> jax.Array:
        """(B, n, D) tokens of one input modality (all its slots given: full grids)."""
        i = spec.index(name)
        sel = np.asarray(self.modality[0]) == i
        return self.tokens[:, sel]


def pooled_mean(tokens: jax.Array, valid: jax.Array) -> jax.Array:
    w = valid.astype(jnp.float32)[..., None]
    return (tokens.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def features_of_batch(model: FourM, batch: Mapping[str, Any]) -> Features:
    enc = model.encode(batch)
    valid = jnp.asarray(batch["enc_valid"], bool)
    return Features(enc.features, valid, jnp.asarray(batch["enc_mod"]), jnp.asarray(batch["enc_pos"]),
                    pooled_mean(enc.features, valid))


def encode_features(model: FourM, inputs: Mapping[str, Any]) -> Features:
    """Encoder features of `inputs` ({modality: images / token ids}); see the module docstring."""
    batch = {k: jnp.asarray(v) for k, v in encoder_batch(model.spec, inputs).items()}
    return features_of_batch(model, batch)


# ------------------------------------------------------------------------------------------------
# A task head on the encoder
# ------------------------------------------------------------------------------------------------
class TaskHead(nnx.Module):
    """Linear classifier on the encoder's features: per input token (dense tasks, logits
    (B, N, C)) or on the pooled feature (B, C). Holds the encoder it reads."""

    def __init__(self, model: FourM, num_classes: int, *, per_token: bool, rngs: nnx.Rngs):
        d = model.spec.dim
        self.encoder = model
        self.per_token = per_token
        self.linear = nnx.Linear(d, num_classes, rngs=rngs)

    def __call__(self, batch: Mapping[str, Any]) -> jax.Array:
        f = features_of_batch(self.encoder, batch)
        return self.linear(f.tokens if self.per_token else f.pooled)


def head_loss(head: TaskHead, batch, labels, mask=None):
    """Mean cross-entropy (per-token: over slots where `mask`, default the valid slots) and accuracy."""
    logits = head(batch).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if head.per_token:
        w = jnp.asarray(batch["enc_valid"], jnp.float32) if mask is None else mask.astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        return (ce * w).sum() / n, (correct * w).sum() / n
    return ce.mean(), correct.mean()


def fit(head: TaskHead, inputs: Mapping[str, Any], labels, *, steps: int, batch_size: int = 32,
        lr: float = 1e-3, train_encoder: bool = False, seed: int = 0, weight_decay: float = 0.0) -> TaskHead:
    """Train the head (linear probe) or head + encoder (full fine-tune) with AdamW on
    (inputs, labels): labels int (B_total, N) per token (aligned with the encoder slots of
    `encoder_batch`) or (B_total,) pooled. Minibatches are drawn with `seed`; returns the head."""
    data = encoder_batch(head.encoder.spec, inputs)
    labels = np.asarray(labels)
    total = labels.shape[0]
    wrt = nnx.Param if train_encoder else nnx.PathContains("linear")
    opt = nnx.Optimizer(head, optax.adamw(lr, weight_decay=weight_decay), wrt=wrt)

    @nnx.jit
    def step(head, opt, batch, y):
        grads = nnx.grad(lambda h: head_loss(h, batch, y)[0], argnums=nnx.DiffState(0, wrt))(head)
        opt.update(head, grads)

    rng = np.random.default_rng(seed)
    for _ in range(int(steps)):
        idx = rng.choice(total, size=min(batch_size, total), replace=False)
        step(head, opt, {k: jnp.asarray(v[idx]) for k, v in data.items()}, jnp.asarray(labels[idx]))
    return head


def evaluate(head: TaskHead, inputs: Mapping[str, Any], labels, batch_size: int = 64) -> dict[str, float]:
    """Held-out mean loss and accuracy (weighted by examples)."""
    data = encoder_batch(head.encoder.spec, inputs)
    labels = np.asarray(labels)
    fn = nnx.jit(head_loss)
    losses, accs, ns = [], [], []
    for s in range(0, labels.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        loss, acc = fn(head, {k: jnp.asarray(v[sl]) for k, v in data.items()}, jnp.asarray(labels[sl]))
        losses.append(float(loss)), accs.append(float(acc)), ns.append(labels[sl].shape[0])
    w = np.asarray(ns, float) / sum(ns)
    return {"loss": float(np.dot(losses, w)), "accuracy": float(np.dot(accs, w))}
