"""Transformer layers in Flax NNX: LayerNorm, attention, MLP, encoder and decoder blocks.

Parameter layouts keep heads as their own axis so tensor parallelism can split them:
  qkv kernel  (embed, 3, heads, head_dim)     4M's qkv.weight (3D, D) transposed and reshaped
  proj kernel (heads, head_dim, embed)        4M's proj.weight (D, D) transposed and reshaped
  mlp fc1/fc3 (embed, mlp), fc2 (mlp, embed)  4M's fc*.weight transposed
Every parameter carries logical axis names (`out_sharding` metadata, see `fourm.model.sharding`).

Blocks are created stacked (leading "layers" axis, `stack`) and run with `lax.scan` (`run_stack`),
optionally under `jax.checkpoint`: one parameter layout whether layers are scanned or unrolled.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fourm.model.sharding import constrain

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def param(value: jax.Array, names: tuple) -> nnx.Param:
    """A parameter with logical axis names (sharding is applied by the caller, not eagerly)."""
    if len(names) != value.ndim:
        raise ValueError(f"logical names {names} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def uniform(rngs: nnx.Rngs, shape, bound: float, dtype) -> jax.Array:
    return jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)


def xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def cast(p, dtype) -> jax.Array:
    return p[...].astype(dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contract the last `n_in` axes of x with the first `n_in` axes of w, as one 2D matmul.

    Flattening the token axes (B, N) into one matters on XLA:CPU: with two batch-like axes its
    weight-gradient dots go through transposing copies and an MLP's backward pass gets slower
    (docs/numerics.md)."""
    lead, k = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    out = w.shape[n_in:]
    y = x.reshape(-1, math.prod(k)) @ w.reshape(math.prod(k), -1)
    return y.reshape(*lead, *out)


ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU default (erf)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


ATTENTION_IMPLS = ("xla", "cudnn", "jax")


def attention_impl(spec_impl: str, dtype, head_dim: int) -> str:
    """The attention kernel; "" (auto) picks one per backend, an explicit config value wins.

    "xla": `_attend_xla`, written for XLA:CPU (the auto choice on CPU, where it was measured
    faster; docs/numerics.md). "cudnn": cuDNN flash attention (auto on GPUs for half precision
    and head dims it supports: multiples of 8 up to 128). "jax": `jax.nn.dot_product_attention`
    with the implementation left to JAX (auto on every other accelerator: the library path,
    until a measurement there says the hand-written one is faster)."""
    if spec_impl:
        return spec_impl
    backend = jax.default_backend()
    if backend == "cpu":
        return "xla"
    if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    return "jax"


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32; the bias is optional (4M nobias)."""

    def __init__(self, dim: int, *, eps: float, use_bias: bool, param_dtype):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """What self- and cross-attention share: the output projection, qk-norm, the attention kernel.

    Subclasses own the input projections (fused qkv, or q plus fused kv; `init_inputs`): their
    parameter names are the names 4M's checkpoints map onto (see `fourm.compat.ml4m`)."""

    def __init__(self, spec, rngs: nnx.Rngs):
        d, h = spec.dim, spec.num_heads
        hd = d // h
        pd = spec.param_dtype
        self.num_heads, self.head_dim, self.dtype = h, hd, spec.dtype
        self.impl = spec.attention_impl
        # Input projections draw their initial values first: a fixed seed keeps its parameters.
        self.init_inputs(spec, rngs)
        self.proj = param(uniform(rngs, (h, hd, d), xavier_bound(d, d), pd),
                          ("heads", "head_dim", "embed"))
        self.proj_bias = param(jnp.zeros((d,), pd), ("embed",)) if spec.proj_bias else None
        if spec.qk_norm:
            self.q_norm = LayerNorm(hd, eps=spec.norm_eps, use_bias=spec.norm_bias, param_dtype=pd)
            self.k_norm = LayerNorm(hd, eps=spec.norm_eps, use_bias=spec.norm_bias, param_dtype=pd)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x: jax.Array, w, b) -> jax.Array:
        y = dense(x.astype(self.dtype), cast(w, self.dtype))
        return y if b is None else y + cast(b, self.dtype)

    def attend_out(self, q, k, v, mask) -> jax.Array:
        """Attention of q over (k, v), then the output projection: (B, Nq, H, hd) -> (B, Nq, D)."""
        y = dense(attend(q, k, v, mask, self.impl, self.dtype), cast(self.proj, self.dtype), 2)
        if self.proj_bias is not None:
            y = y + cast(self.proj_bias, self.dtype)
        return y


def _fused_init(rngs, spec, n: int):
    """(embed, n, heads, head_dim) kernel: 4M initialises each of the n parts like a separate
    (D, D) xavier matrix; bias (n, heads, head_dim) or None."""
    d, h, pd = spec.dim, spec.num_heads, spec.param_dtype
    w = param(uniform(rngs, (d, n, h, d // h), xavier_bound(d, d), pd), ("embed", "qkv", "heads", "head_dim"))
    b = param(jnp.zeros((n, h, d // h), pd), ("qkv", "heads", "head_dim")) if spec.qkv_bias else None
    return w, b


class SelfAttention(Attention):
    """Multi-head self-attention with fused qkv (4M's Attention / NormAttention with qk_norm)."""

    def init_inputs(self, spec, rngs: nnx.Rngs):
        self.qkv, self.qkv_bias = _fused_init(rngs, spec, 3)

    def qkv_heads(self, x: jax.Array):
        """x (B, N, D) -> q, k, v (B, N, H, hd), qk-normed when configured."""
        qkv = self.project(x, self.qkv, self.qkv_bias)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return self.attend_out(*self.qkv_heads(x), mask)


class CrossAttention(Attention):
    """Multi-head cross-attention: queries from the decoder, keys/values from the context."""

    def init_inputs(self, spec, rngs: nnx.Rngs):
        d, h, pd = spec.dim, spec.num_heads, spec.param_dtype
        self.q = param(uniform(rngs, (d, h, d // h), xavier_bound(d, d), pd),
                       ("embed", "heads", "head_dim"))
        self.q_bias = param(jnp.zeros((h, d // h), pd), ("heads", "head_dim")) if spec.qkv_bias else None
        self.kv, self.kv_bias = _fused_init(rngs, spec, 2)

    def context_kv(self, ctx: jax.Array):
        """Normed context (B, S, D) -> k, v (B, S, H, hd); computed once per layer (and cached)."""
        kv = self.project(ctx, self.kv, self.kv_bias)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        q = self.project(x, self.q, self.q_bias)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return self.attend_out(q, k, v, mask)


def attend(q, k, v, mask, impl: str, dtype) -> jax.Array:
    """Scaled dot-product attention: q (B, Nq, H, hd), k, v (B, Nk, H, hd) -> (B, Nq, H, hd).

    `mask` is boolean, True = may attend, broadcastable to (B, H, Nq, Nk). A query row with no
    visible key (a padding slot) gets a uniform average instead of NaN, like 4M's -finfo.max fill.
    `impl` as in `attention_impl`.
    """
    q = constrain(q, ("batch", "seq", "act_heads", None))
    impl = attention_impl(impl, dtype, q.shape[-1])
    if impl == "xla":
        return _attend_xla(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5,
                                        implementation=None if impl == "jax" else impl)


def _attend_xla(q, k, v, mask) -> jax.Array:
    """The maths of jax.nn.dot_product_attention(implementation="xla"), bit-identical on CPU, with
    heads moved next to the batch axis once. That function keeps (B, N, H, hd) operands in its
    einsums, and XLA:CPU then transposes operands around every score/value matmul of the
    backward pass (the measurement: docs/numerics.md)."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, N, hd)
    scale = jnp.asarray(q.shape[-1] ** -0.5, jnp.promote_types(q.dtype, jnp.float32))
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=scale.dtype) * scale
    if mask is not None:
        s = jnp.where(mask, s, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, s.dtype))
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3)


class Mlp(nnx.Module):
    """fc2(act(fc1 x)) or, gated (SwiGLU), fc2(act(fc1 x) * fc3 x) - 4M's Mlp / GatedMlp."""

    def __init__(self, spec, rngs: nnx.Rngs):
        d, f, pd = spec.dim, spec.mlp_hidden, spec.param_dtype
        self.dtype, self.act = spec.dtype, ACTIVATIONS[spec.act]
        self.fc1 = param(uniform(rngs, (d, f), xavier_bound(d, f), pd), ("embed", "mlp"))
        self.fc1_bias = param(jnp.zeros((f,), pd), ("mlp",)) if spec.mlp_bias else None
        self.fc3 = (param(uniform(rngs, (d, f), xavier_bound(d, f), pd), ("embed", "mlp"))
                    if spec.gated_mlp else None)
        self.fc3_bias = (param(jnp.zeros((f,), pd), ("mlp",))
                         if spec.gated_mlp and spec.mlp_bias else None)
        self.fc2 = param(uniform(rngs, (f, d), xavier_bound(f, d), pd), ("mlp", "embed"))
        self.fc2_bias = param(jnp.zeros((d,), pd), ("embed",)) if spec.mlp_bias else None

    def _dense(self, x, w, b):
        y = dense(x, cast(w, self.dtype))
        return y if b is None else y + cast(b, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = self.act(self._dense(x, self.fc1, self.fc1_bias))
        if self.fc3 is not None:
            h = h * self._dense(x, self.fc3, self.fc3_bias)
        h = constrain(h, ("batch", "seq", "act_mlp"))
        return self._dense(h, self.fc2, self.fc2_bias)


class EncoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, spec, rngs: nnx.Rngs):
        ln = dict(eps=spec.norm_eps, use_bias=spec.norm_bias, param_dtype=spec.param_dtype)
        self.norm1 = LayerNorm(spec.dim, **ln)
        self.attn = SelfAttention(spec, rngs)
        self.norm2 = LayerNorm(spec.dim, **ln)
        self.mlp = Mlp(spec, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask).astype(x.dtype)
        x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return constrain(x, ("batch", "seq", "act_embed"))


@struct.dataclass
class KVCache:
    """One decoder layer's keys/values: of the tokens so far (B, T, H, hd) and of the context
    (B, S, H, hd). Stacked over layers (leading axis L) when a model holds it."""

    k: jax.Array
    v: jax.Array
    ck: jax.Array
    cv: jax.Array


class DecoderBlock(nnx.Module):
    """Self-attention, cross-attention (query_norm / context_norm), MLP; all pre-norm."""

    def __init__(self, spec, rngs: nnx.Rngs):
        ln = dict(eps=spec.norm_eps, use_bias=spec.norm_bias, param_dtype=spec.param_dtype)
        self.norm1 = LayerNorm(spec.dim, **ln)
        self.self_attn = SelfAttention(spec, rngs)
        self.query_norm = LayerNorm(spec.dim, **ln)
        self.context_norm = LayerNorm(spec.dim, **ln)
        self.cross_attn = CrossAttention(spec, rngs)
        self.norm2 = LayerNorm(spec.dim, **ln)
        self.mlp = Mlp(spec, rngs)

    def __call__(self, x, context, self_mask, cross_mask, cache: KVCache | None = None,
                 write_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """x (B, N, D) -> (x, cache).

        Without `cache`: a full pass over x attending to `context` (B, S, D); the returned cache
        holds this pass's keys/values (a prefill keeps them, a training step drops them and XLA
        never materialises them). With `cache`: x holds one new token per row, its keys/values
        are written at `write_at` (B,) into the cache, self-attention reads the whole cache and
        cross-attention the cached context keys/values (`context` is unused)."""
        q, k, v = self.self_attn.qkv_heads(self.norm1(x))
        if cache is None:
            ck, cv = self.cross_attn.context_kv(self.context_norm(context))
            cache = KVCache(k, v, ck, cv)
        else:
            rows = jnp.arange(x.shape[0])
            cache = cache.replace(k=cache.k.at[rows, write_at].set(k[:, 0].astype(cache.k.dtype)),
                                  v=cache.v.at[rows, write_at].set(v[:, 0].astype(cache.v.dtype)))
        x = x + self.self_attn.attend_out(q, cache.k, cache.v, self_mask).astype(x.dtype)
        x = x + self.cross_attn(self.query_norm(x), cache.ck, cache.cv, cross_mask).astype(x.dtype)
        x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return constrain(x, ("batch", "seq", "act_embed")), cache


# ---------------------------------------------------------------------------------------------
# Stacked blocks
# ---------------------------------------------------------------------------------------------

REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
    """`depth` blocks as one module whose parameters have a leading "layers" axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=depth,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r):
        return make(r)

    return create(rngs)


def run_stack(blocks: nnx.Module, fn: Callable, carry, xs=None, *, scan: bool, remat: str):
    """carry, ys = scan over layers of fn(block_i, carry, xs_i) -> (carry, y_i).

    `scan=False` unrolls the loop (same parameters; sometimes faster for shallow models, and
    what XLA needs to overlap FSDP all-gathers of layer i+1 with compute of layer i on some
    backends). `remat` names a `jax.checkpoint` policy applied per block.
    """
    graphdef, state = nnx.split(blocks)

    def step(c, layer):
        st, x = layer
        return fn(nnx.merge(graphdef, st), c, x)

    if remat and remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={remat!r}; known: none, {', '.join(REMAT_POLICIES)}")
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    depth = jax.tree.leaves(state)[0].shape[0]
    return jax.lax.scan(step, carry, (state, xs), unroll=1 if scan else depth)
