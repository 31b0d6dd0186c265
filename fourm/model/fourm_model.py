"""`FourM`: the 4M encoder-decoder in Flax NNX, consuming `fourm.batch`'s masked batch.

    model = FourM(spec, rngs=nnx.Rngs(0))          # or build_model(config.model, modalities)
    enc = model.encode(batch)                      # Encoded: normed encoder output + embeddings
    y = model.decode(enc, batch)                   # (B, N_dec, D) decoder_norm output
    loss, metrics = fourm.model.loss_fn(model, batch)

Encoder slot = content (token embedding, or a linear projection of the pixel patch at `enc_pos`)
+ position (fixed sin-cos table row `enc_pos`) + learned modality embedding; padding slots are 0
and never attended to. Register tokens (if any) are prepended. Decoder slot = mask token (grid
targets) or the decoder token embedding of `dec_ids` (teacher-forced sequences) + position +
modality embedding. Decoder self-attention: same modality only, bidirectional for grids, causal
(slot order) for sequences. Cross-attention context = decoder_proj_context(encoder output) +
the encoder's position/modality embeddings; every valid encoder slot (and register) is visible.

All per-modality work is a static Python loop over modalities of masked gathers: no loops over
tokens, one compiled program for every batch of the same shapes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fourm.batch import PIXELS_PREFIX
from fourm.modalities import Modality
from fourm.model import layers
from fourm.model.embeddings import DecoderEmbedding, EncoderEmbedding, fixed_pos_table, patchify
from fourm.model.heads import own_vocab_loss, own_vocab_nll
from fourm.model.layers import cast, param
from fourm.model.sharding import constrain
from fourm.model.spec import ModelSpec


@struct.dataclass
class Encoded:
    """Encoder result. Rows = registers (first `num_registers`) then the batch's encoder slots."""

    x: jax.Array  # (B, R + N_enc, D) output of encoder_norm
    emb: jax.Array  # (B, R + N_enc, D) position + modality embedding of each row (0 for registers)
    valid: jax.Array  # (B, R + N_enc) bool
    num_registers: int = struct.field(pytree_node=False, default=0)

    @property
    def features(self) -> jax.Array:
        """(B, N_enc, D) encoder features aligned with the batch's encoder slots."""
        return self.x[:, self.num_registers:]


class BatchError(ValueError):
    """A batch that does not fit the model (names the key, expected and actual)."""


class FourM(nnx.Module):
    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d, pd = spec.dim, spec.param_dtype
        normal = lambda shape: spec.init_std * jax.random.normal(rngs.params(), shape, pd)  # noqa: E731
        mods = spec.modalities
        self.enc_embed = nnx.Dict({mods[i].name: EncoderEmbedding(
            mods[i], spec, mods[i].name in spec.learned_pos_emb, rngs) for i in spec.inputs})
        self.dec_embed = nnx.Dict({mods[i].name: DecoderEmbedding(
            mods[i], spec, mods[i].name in spec.learned_pos_emb, rngs) for i in spec.targets})
        # Modality embeddings: one per input modality; targets reuse it when shared (4M default).
        self.mod_emb = nnx.Dict({n: param(normal((d,)), ("embed",)) for n in spec.domains_in})
        self.dec_mod_emb = nnx.Dict({n: param(normal((d,)), ("embed",)) for n in spec.domains_out
                                     if not (spec.share_modality_embeddings and n in spec.domains_in)})
        self.mask_token = param(normal((d,)), ("embed",))
        self.registers = (param(normal((spec.num_register_tokens, d)), ("registers", "embed"))
                          if spec.num_register_tokens else None)
        ln = dict(eps=spec.norm_eps, use_bias=spec.norm_bias, param_dtype=pd)
        self.encoder = layers.stack(lambda r: layers.EncoderBlock(spec, r), spec.encoder_depth, rngs)
        self.encoder_norm = layers.LayerNorm(d, **ln)
        self.context_proj = param(layers.uniform(rngs, (d, d), layers.xavier_bound(d, d), pd), ("embed", None))
        self.context_proj_bias = param(jnp.zeros((d,), pd), ("embed",))
        self.decoder = layers.stack(lambda r: layers.DecoderBlock(spec, r), spec.decoder_depth, rngs)
        self.decoder_norm = layers.LayerNorm(d, **ln)

    # ---------------------------------------------------------------------------------------
    # embeddings
    # ---------------------------------------------------------------------------------------
    def pos_table(self, name: str, side: str) -> jax.Array:
        emb = (self.enc_embed if side == "enc" else self.dec_embed)[name]
        if emb.pos is not None:
            return emb.pos[...]
        return jnp.asarray(fixed_pos_table(self.spec.modality(name), self.spec.dim, self.spec.seq_pos_len))

    def modality_embedding(self, name: str, side: str) -> jax.Array:
        if side == "dec" and name in self.dec_mod_emb:
            return self.dec_mod_emb[name][...]
        return self.mod_emb[name][...]

    def position_embedding(self, name: str, side: str, pos: jax.Array) -> jax.Array:
        """pos (...) -> (..., D): position row + modality embedding (the `emb` of 4M)."""
        table = self.pos_table(name, side)
        return jnp.take(table, pos, axis=0, mode="clip") + self.modality_embedding(name, side)

    def embed_inputs(self, batch: Mapping[str, jax.Array]):
        """(content (B, N, D), emb (B, N, D)) of the encoder slots; zeros at padding."""
        spec = self.spec
        ids, mod, pos, valid = (batch[k] for k in ("enc_ids", "enc_mod", "enc_pos", "enc_valid"))
        b, n = ids.shape
        x = jnp.zeros((b, n, spec.dim), spec.dtype)
        emb = jnp.zeros((b, n, spec.dim), jnp.float32)
        for i in spec.inputs:
            m = spec.modalities[i]
            sel = ((mod == i) & valid)[..., None]
            e = self.enc_embed[m.name]
            if m.kind == "pixels":
                patches = patchify(batch[PIXELS_PREFIX + m.name].astype(spec.dtype), e.patch)
                picked = jnp.take_along_axis(patches, jnp.clip(pos, 0, patches.shape[1] - 1)[..., None], axis=1)
                content = picked @ cast(e.proj, spec.dtype)
            else:
                content = jnp.take(cast(e.token_emb, spec.dtype), ids, axis=0, mode="clip")
            x = jnp.where(sel, content, x)
            emb = jnp.where(sel, self.position_embedding(m.name, "enc", pos).astype(jnp.float32), emb)
        return x, emb

    def embed_targets(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Decoder inputs (B, N_dec, D): mask token / teacher-forced token + position + modality."""
        spec = self.spec
        ids, mod, pos, valid = (batch[k] for k in ("dec_ids", "dec_mod", "dec_pos", "dec_valid"))
        b, n = ids.shape
        y = jnp.zeros((b, n, spec.dim), jnp.float32)
        mask_token = self.mask_token[...].astype(jnp.float32)
        for i in spec.targets:
            m = spec.modalities[i]
            sel = ((mod == i) & valid)[..., None]
            e = self.dec_embed[m.name]
            if m.kind == "sequence":
                content = jnp.take(cast(e.token_emb, jnp.float32), ids, axis=0, mode="clip")
            else:
                content = mask_token
            y = jnp.where(sel, content + self.position_embedding(m.name, "dec", pos), y)
        return y

    # ---------------------------------------------------------------------------------------
    # encoder / decoder
    # ---------------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, jax.Array]) -> Encoded:
        """Encoder features for the batch's encoder slots (also the encoder-only API)."""
        spec = self.spec
        check_batch_shapes(spec, batch, decoder=False)
        x, emb = self.embed_inputs(batch)
        valid = batch["enc_valid"].astype(bool)
        h = x.astype(jnp.float32) + emb
        if self.registers is not None:
            b = h.shape[0]
            reg = jnp.broadcast_to(self.registers[...].astype(jnp.float32), (b,) + self.registers.shape)
            h = jnp.concatenate([reg, h], axis=1)
            emb = jnp.concatenate([jnp.zeros_like(reg), emb], axis=1)
            valid = jnp.concatenate([jnp.ones(reg.shape[:2], bool), valid], axis=1)
        h = constrain(h.astype(spec.dtype), ("batch", "seq", "act_embed"))
        mask = valid[:, None, None, :]
        h, _ = layers.run_stack(self.encoder, lambda blk, c, _: (blk(c, mask), None), h,
                                scan=spec.scan_layers, remat=spec.remat)
        return Encoded(self.encoder_norm(h), emb, valid, spec.num_register_tokens)

    def context(self, enc: Encoded) -> jax.Array:
        """Cross-attention context: decoder_proj_context(encoder output) + position/modality emb."""
        dt = self.spec.dtype
        ctx = enc.x.astype(dt) @ cast(self.context_proj, dt) + cast(self.context_proj_bias, dt)
        return constrain((ctx.astype(jnp.float32) + enc.emb).astype(dt), ("batch", "seq", "act_embed"))

    def decoder_self_mask(self, dec_mod: jax.Array, dec_valid: jax.Array) -> jax.Array:
        """(B, 1, N, N) bool: same modality, valid key, and causal (j <= i) for sequences."""
        spec = self.spec
        causal_kind = jnp.asarray([m.kind == "sequence" or spec.decoder_causal for m in spec.modalities])
        q_causal = causal_kind[jnp.clip(dec_mod, 0, len(spec.modalities) - 1)]
        return self_attention_mask(dec_valid, q_causal, same=dec_mod[:, :, None] == dec_mod[:, None, :])

    def run_decoder(self, y: jax.Array, context: jax.Array, self_mask, cross_mask) -> jax.Array:
        spec = self.spec
        y = constrain(y.astype(spec.dtype), ("batch", "seq", "act_embed"))
        y, _ = layers.run_stack(self.decoder, lambda blk, c, _: (blk(c, context, self_mask, cross_mask)[0], None),
                                y, scan=spec.scan_layers, remat=spec.remat)
        return self.decoder_norm(y)

    def decode(self, enc: Encoded, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Decoder output (B, N_dec, D) after decoder_norm for the batch's decoder slots."""
        check_batch_shapes(self.spec, batch, decoder=True)
        y = self.embed_targets(batch)
        self_mask = self.decoder_self_mask(batch["dec_mod"], batch["dec_valid"].astype(bool))
        return self.run_decoder(y, self.context(enc), self_mask, enc.valid[:, None, None, :])

    # ---------------------------------------------------------------------------------------
    # heads
    # ---------------------------------------------------------------------------------------
    def head_weight(self, name: str) -> jax.Array:
        """(V, D) output projection of target modality `name` (4M's to_logits.weight)."""
        return self.dec_embed[name].head()[...]

    def logits(self, y: jax.Array, name: str) -> jax.Array:
        """Full float32 logits over `name`'s vocabulary for decoder outputs y (..., D)."""
        dt = self.spec.dtype
        return jnp.dot(y.astype(dt), self.head_weight(name).astype(dt).T, preferred_element_type=jnp.float32)

    def target_head_ids(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """(B, N_dec) index into spec.targets of each slot's head; len(targets) = no loss."""
        spec = self.spec
        targets = spec.targets
        lookup = jnp.full((len(spec.modalities),), len(targets), jnp.int32)
        lookup = lookup.at[jnp.asarray(targets, jnp.int32)].set(jnp.arange(len(targets), dtype=jnp.int32))
        has_loss = batch["dec_valid"].astype(bool) & batch.get("dec_loss", batch["dec_valid"]).astype(bool)
        return jnp.where(has_loss, lookup[jnp.clip(batch["dec_mod"], 0, len(spec.modalities) - 1)],
                         len(targets))

    def _head_weights(self) -> tuple:
        spec = self.spec
        return tuple(self.head_weight(spec.modalities[i].name).astype(spec.dtype) for i in spec.targets)

    def target_nll(self, y: jax.Array, batch: Mapping[str, jax.Array]):
        """Per-slot (nll, correct) under each slot's own head; slots without loss get nll 0."""
        spec = self.spec
        head_ids = self.target_head_ids(batch)
        nll, correct = own_vocab_nll(y.astype(spec.dtype), head_ids, batch["dec_targets"],
                                     self._head_weights(), impl=head_impl(spec.head_impl), chunk=spec.head_chunk)
        return nll, correct, head_ids

    def target_loss(self, y: jax.Array, batch: Mapping[str, jax.Array], head_ids: jax.Array,
                    token_weights: jax.Array):
        """(sum(token_weights * nll), nll, correct): the training loss with its gradients computed
        alongside the head's forward pass (see `fourm.model.heads.own_vocab_loss`)."""
        spec = self.spec
        return own_vocab_loss(y.astype(spec.dtype), head_ids, batch["dec_targets"], self._head_weights(),
                              token_weights, impl=head_impl(spec.head_impl), chunk=spec.head_chunk)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        return self.decode(self.encode(batch), batch)


def head_impl(configured: str) -> str:
    """The output head + cross-entropy; "" (auto) picks one per backend, an explicit value wins.

    "chunked" (`fourm.model.heads`: logits only over each slot's own vocabulary, loss gradients
    inside the forward loops) was written for and measured on XLA:CPU, where it is the auto
    choice; accelerators get "dense", plain cross-entropy over every head's logits, until a
    measurement there says otherwise (docs/numerics.md)."""
    if configured:
        return configured
    return "chunked" if jax.default_backend() == "cpu" else "dense"


def self_attention_mask(key_valid: jax.Array, causal: jax.Array, *, same: jax.Array | None = None,
                        q_pos: jax.Array | None = None) -> jax.Array:
    """The decoder's self-attention mask (B, 1, Nq, Nk), True = query i may see key j.

    Key j must be valid (`key_valid` (B, Nk)), in the same group as i when `same` (B, Nq, Nk) is
    given, and, for causal queries (`causal` (B, Nq) bool), at a position <= the query's. Keys sit
    at positions 0..Nk-1; queries too, unless `q_pos` (B, Nq) places them (new tokens appended to
    a KV cache)."""
    nq, nk = causal.shape[-1], key_valid.shape[-1]
    if q_pos is None:
        q_pos = jnp.arange(nq, dtype=jnp.int32)[None]
    before = jnp.arange(nk, dtype=jnp.int32)[None, None, :] <= q_pos[:, :, None]
    mask = key_valid[:, None, :] & (~causal[:, :, None] | before)
    if same is not None:
        mask = mask & same
    return mask[:, None]


def check_batch_shapes(spec: ModelSpec, batch: Mapping[str, Any], *, decoder: bool) -> None:
    """Static (trace-time) checks: keys present, shapes consistent, pixel images of the right size."""
    keys = ("dec_ids", "dec_targets", "dec_mod", "dec_pos", "dec_valid") if decoder else (
        "enc_ids", "enc_mod", "enc_pos", "enc_valid")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise BatchError(f"batch lacks {missing}; it has {sorted(batch)} (see fourm.batch)")
    shape = tuple(batch[keys[0]].shape)
    if len(shape) != 2:
        raise BatchError(f"batch[{keys[0]!r}] must be (B, N), got shape {shape}")
    for k in keys[1:] + (("dec_loss",) if decoder and "dec_loss" in batch else ()):
        if tuple(batch[k].shape) != shape:
            raise BatchError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {shape} "
                             f"like batch[{keys[0]!r}]")
    if decoder:
        return
    for i in spec.inputs:
        m = spec.modalities[i]
        if m.kind != "pixels":
            continue
        key = PIXELS_PREFIX + m.name
        want = (shape[0], m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, m.channels)
        if key not in batch:
            raise BatchError(f"batch lacks {key!r} (pixel input {m.name!r}, shape {want})")
        if tuple(batch[key].shape) != want:
            raise BatchError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {want} "
                             f"(B, H, W, C) for {m.name!r}")


def build_model(cfg: Mapping[str, Any], modalities: Sequence[Modality] | None = None, *,
                seed: int = 0, rngs: nnx.Rngs | None = None) -> FourM:
    """FourM from `config.model` and a modality list (default: resolve cfg.modalities)."""
    spec = cfg if isinstance(cfg, ModelSpec) else ModelSpec.from_config(cfg, modalities)
    return FourM(spec, rngs=rngs if rngs is not None else nnx.Rngs(params=seed))
