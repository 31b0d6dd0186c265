"""The size table (4M's tiny ... xlarge) and the model config every other part starts from.

One place knows each fact: widths, depths and heads of the 4M sizes, the two block variants 4M
released (SwiGLU without biases - the published models - and GELU with biases), and the MLP
hidden-width rule. `model_config(size, variant)` turns them into the `config.model` ConfigDict
that `fourm.model.FourM` consumes; `configs/model.py` and the trainer configs call it.
"""

from __future__ import annotations

import ml_collections

# dim, encoder depth, decoder depth, heads (4M's fm_<size>_<e>e_<d>d_* constructors).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=384, encoder_depth=6, decoder_depth=6, num_heads=6),
    "small": dict(dim=512, encoder_depth=8, decoder_depth=8, num_heads=8),
    "base": dict(dim=768, encoder_depth=12, decoder_depth=12, num_heads=12),
    "large": dict(dim=1024, encoder_depth=24, decoder_depth=24, num_heads=16),
    "xlarge": dict(dim=2048, encoder_depth=24, decoder_depth=24, num_heads=32),
}

# Block variants. `swiglu` = 4M's *_swiglu_nobias (the released checkpoints), `gelu` = 4M's *_gelu
# (exact erf GELU as torch.nn.GELU, biases on qkv/proj/mlp and LayerNorm).
VARIANTS: dict[str, dict] = {
    "swiglu": dict(act="silu", gated_mlp=True, qkv_bias=False, proj_bias=False, mlp_bias=False,
                   norm_bias=False, qk_norm=False),
    "swiglu_qknorm": dict(act="silu", gated_mlp=True, qkv_bias=False, proj_bias=False,
                          mlp_bias=False, norm_bias=False, qk_norm=True),
    "gelu": dict(act="gelu", gated_mlp=False, qkv_bias=True, proj_bias=True, mlp_bias=True,
                 norm_bias=True, qk_norm=False),
}


def mlp_hidden_dim(dim: int, mlp_ratio: float, gated: bool) -> int:
    """4M's rule: int(dim * ratio), and for gated MLPs two thirds of that (int(2 * h / 3))."""
    hidden = int(dim * mlp_ratio)
    return int(2 * hidden / 3) if gated else hidden


def model_config(size: str = "tiny", variant: str = "swiglu") -> ml_collections.ConfigDict:
    """`config.model` for a 4M size and block variant. Every field is documented here."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.size = size
    c.variant = variant
    c.update(SIZES[size])
    c.update(VARIANTS[variant])
    c.mlp_ratio = 4.0
    c.mlp_hidden = 0  # 0 = mlp_hidden_dim(dim, mlp_ratio, gated_mlp); >0 overrides the rule
    c.norm_eps = 1e-6
    c.num_register_tokens = 0
    c.share_modality_embeddings = True  # one modality embedding for encoder and decoder (4M)
    c.tie_output_embeddings = False  # True: to_logits = decoder token embedding (4M's FM: False)
    c.decoder_causal = False  # 4M's decoder_causal_mask: causal within every target modality
    c.init_std = 0.02

    # Modalities: the model's modality order (indices of enc_mod / dec_mod in the batch).
    c.family = "fourm"  # registry family the names resolve in (fourm.modalities)
    c.modalities = ["rgb@64", "tok_rgb@64", "tok_depth@64", "tok_normal@64", "tok_semseg@64",
                    "caption", "det"]
    c.domains_in = []  # encoder inputs; empty = every modality
    c.domains_out = []  # decoder targets; empty = every non-pixel modality
    c.vocab_overrides = ml_collections.ConfigDict()  # {name: vocab} from the trained tokenizers
    c.learned_pos_emb = []  # modalities with a learned (not sin-cos) position table (4M *_global)
    c.seq_pos_len = 512  # rows of the 1D sin-cos table of sequence modalities (4M: 512)

    # Efficiency.
    c.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
    c.param_dtype = "float32"
    # jax.checkpoint policy per block: none | full | dots | dots_no_batch. dots_no_batch keeps the
    # projection / MLP matmul outputs and recomputes the cheap rest in the backward pass: less
    # memory, and on XLA:CPU 5-8% faster than none (fewer residual buffers to write and fault in).
    c.remat = "dots_no_batch"
    c.scan_layers = True  # lax.scan over stacked blocks (False: fully unrolled, same params)
    # "" = per backend: the hand-tuned CPU paths on CPU, the library paths on accelerators
    # (fourm.model.layers.attention_impl, fourm.model.fourm_model.head_impl; docs/numerics.md).
    c.attention_impl = ""  # xla (hand-written, CPU) | cudnn | jax (jax.nn.dot_product_attention)
    c.head_impl = ""  # chunked: logits only over each token's own vocabulary | dense: plain CE
    c.head_chunk = 128  # target tokens per head matmul in the chunked head
    c.loss_type = "mod"  # mod: mean over target modalities of their mean CE (4M) | token
    return c
