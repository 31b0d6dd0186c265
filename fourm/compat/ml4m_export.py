"""fourm -> 4M: write a model as 4M's config.json + model.safetensors (the inverse of `ml4m.load`).

    export(model, "out_4m/")      # loadable by 4M's FM.from_pretrained and by fourm.compat.ml4m

Only models whose structure 4M can express export (4M-family modality names, 4M's geometry,
sin-cos positions or 4M's learned ones); anything else is an error naming the problem. The
tests use it to round-trip every variant the converter supports (GELU with biases, qk-norm,
registers, unshared modality embeddings, learned positions) through `ml4m.load`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fourm.compat import ml4m
from fourm.model.embeddings import fixed_pos_table
from fourm.model.pretrained import atomic_write, flat_params, write_safetensors
from fourm.model.sizes import mlp_hidden_dim

_ACTS = {v: k for k, v in ml4m.ACTIVATIONS.items()}


def ml4m_config(spec) -> dict:
    if spec.act not in _ACTS:
        raise ValueError(f"activation {spec.act!r} has no 4M equivalent; 4M knows {sorted(_ACTS)}")
    if spec.tie_output_embeddings:
        raise ValueError("4M's FM builds untied output heads; a model with tie_output_embeddings cannot export")
    ratio = _mlp_ratio(spec)
    # image_size only sizes the *_global grids (patch 56); every other 4M modality has its own
    # input size and patch size in 4M's modality table, so config.json's values do not touch it.
    sides = {spec.modality(n).grid[0] * 56 for n in spec.names if n.endswith("_global")}
    if len(sides) > 1:
        raise ValueError(f"global-token modalities with different grids {sorted(sides)} need different "
                         "image sizes; 4M's config has one")
    image_size = sides.pop() if sides else 224
    return dict(act_layer=_ACTS[spec.act], decoder_causal_mask=spec.decoder_causal, decoder_depth=spec.decoder_depth,
                decoder_sep_mask=True, dim=spec.dim, domains_in=list(spec.domains_in),
                domains_out=list(spec.domains_out), drop_path_rate_decoder=0.0, drop_path_rate_encoder=0.0,
                encoder_depth=spec.encoder_depth, gated_mlp=spec.gated_mlp, image_size=image_size,
                mlp_bias=spec.mlp_bias, mlp_ratio=ratio, norm_bias=spec.norm_bias, num_heads=spec.num_heads,
                num_register_tokens=spec.num_register_tokens, patch_size=16, proj_bias=spec.proj_bias,
                qk_norm=spec.qk_norm, qkv_bias=spec.qkv_bias,
                share_modality_embeddings=spec.share_modality_embeddings, shared_drop_path=False,
                use_act_checkpoint=False)


def _mlp_ratio(spec) -> float:
    """An mlp_ratio for which 4M's rule (int(dim * r), gated: two thirds of it) gives mlp_hidden."""
    h = spec.mlp_hidden
    for full in ((h * 3 + 1) // 2, (h * 3) // 2, (h * 3 + 2) // 2) if spec.gated_mlp else (h,):
        for ratio in (full / spec.dim, (full + 0.5) / spec.dim):
            if mlp_hidden_dim(spec.dim, ratio, spec.gated_mlp) == h:
                return ratio
    raise ValueError(f"mlp_hidden={h} cannot come from 4M's rule for dim {spec.dim} "
                     f"({'gated: int(2 * int(dim * r) / 3)' if spec.gated_mlp else 'int(dim * r)'})")


def ml4m_state_dict(model) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, aliases) in 4M's state-dict naming; aliases as safetensors' save_model writes them."""
    spec = model.spec
    p = {k: np.asarray(v, np.float32) for k, v in flat_params(model).items()}
    d, h = spec.dim, spec.num_heads
    out: dict[str, np.ndarray] = {"mask_token": p["mask_token"][None, None]}
    aliases: dict[str, str] = {}
    if spec.num_register_tokens:
        out["register_tokens"] = p["registers"][None]

    def pos(pre, n, side):
        m = spec.modality(n)
        learned = f"{side}/{n}/pos"
        if learned in p:
            out[f"{pre}.pos_emb"] = p[learned][None]
        else:
            rows = spec.seq_pos_len if m.kind == "sequence" else m.num_tokens
            out[f"{pre}.pos_emb"] = fixed_pos_table(m, d, spec.seq_pos_len)[:rows][None]

    for n in spec.domains_in:
        m, pre = spec.modality(n), f"encoder_embeddings.{n}"
        if m.kind == "pixels":
            out[f"{pre}.proj.weight"] = p[f"enc_embed/{n}/proj"].T
        else:
            out[f"{pre}.token_emb.weight"] = p[f"enc_embed/{n}/token_emb"]
        pos(pre, n, "enc_embed")
        out[f"{pre}.mod_emb"] = p[f"mod_emb/{n}"][None, None]
    for n in spec.domains_out:
        m, pre = spec.modality(n), f"decoder_embeddings.{n}"
        out[f"{pre}.to_logits.weight"] = p[f"dec_embed/{n}/to_logits"]
        out[f"{pre}.token_emb.weight"] = (p[f"dec_embed/{n}/token_emb"] if m.kind == "sequence"
                                          else np.zeros((m.vocab_size, d), np.float32))  # unread by 4M
        pos(pre, n, "dec_embed")
        if f"dec_mod_emb/{n}" in p:
            out[f"{pre}.mod_emb"] = p[f"dec_mod_emb/{n}"][None, None]
        else:  # one shared Parameter: stored once under the decoder name (as save_model does)
            out[f"{pre}.mod_emb"] = out.pop(f"encoder_embeddings.{n}.mod_emb")
            aliases[f"encoder_embeddings.{n}.mod_emb"] = f"{pre}.mod_emb"

    def norm(dst, src, i=None, dim=d):
        w = p[f"{src}/scale"] if i is None else p[f"{src}/scale"][i]
        out[f"{dst}.weight"] = w
        b = p.get(f"{src}/bias")
        out[f"{dst}.bias"] = (b if i is None else b[i]) if b is not None else np.zeros(dim, np.float32)

    def attn(dst, src, i):
        out[f"{dst}.qkv.weight"] = p[f"{src}/qkv"][i].reshape(d, 3 * d).T
        out[f"{dst}.proj.weight"] = p[f"{src}/proj"][i].reshape(d, d).T
        if spec.qkv_bias:
            out[f"{dst}.qkv.bias"] = p[f"{src}/qkv_bias"][i].reshape(-1)
        if spec.proj_bias:
            out[f"{dst}.proj.bias"] = p[f"{src}/proj_bias"][i]
        if spec.qk_norm:
            for qk in ("q_norm", "k_norm"):
                norm(f"{dst}.{qk}", f"{src}/{qk}", i, d // h)

    for side, depth in (("encoder", spec.encoder_depth), ("decoder", spec.decoder_depth)):
        for i in range(depth):
            pre = f"{side}.{i}"
            norm(f"{pre}.norm1", f"{side}/norm1", i)
            norm(f"{pre}.norm2", f"{side}/norm2", i)
            if side == "encoder":
                attn(f"{pre}.attn", "encoder/attn", i)
            else:
                attn(f"{pre}.self_attn", "decoder/self_attn", i)
                norm(f"{pre}.query_norm", "decoder/query_norm", i)
                norm(f"{pre}.context_norm", "decoder/context_norm", i)
                ca, src = f"{pre}.cross_attn", "decoder/cross_attn"
                out[f"{ca}.q.weight"] = p[f"{src}/q"][i].reshape(d, d).T
                out[f"{ca}.kv.weight"] = p[f"{src}/kv"][i].reshape(d, 2 * d).T
                out[f"{ca}.proj.weight"] = p[f"{src}/proj"][i].reshape(d, d).T
                if spec.qkv_bias:
                    out[f"{ca}.q.bias"] = p[f"{src}/q_bias"][i].reshape(-1)
                    out[f"{ca}.kv.bias"] = p[f"{src}/kv_bias"][i].reshape(-1)
                if spec.proj_bias:
                    out[f"{ca}.proj.bias"] = p[f"{src}/proj_bias"][i]
                if spec.qk_norm:
                    for qk in ("q_norm", "k_norm"):
                        norm(f"{ca}.{qk}", f"{src}/{qk}", i, d // h)
            for fc in ("fc1", "fc2", "fc3") if spec.gated_mlp else ("fc1", "fc2"):
                out[f"{pre}.mlp.{fc}.weight"] = p[f"{side}/mlp/{fc}"][i].T
                if spec.mlp_bias:
                    out[f"{pre}.mlp.{fc}.bias"] = p[f"{side}/mlp/{fc}_bias"][i]
        norm(f"{side}_norm", f"{side}_norm")
    out["decoder_proj_context.weight"] = p["context_proj"].T
    out["decoder_proj_context.bias"] = p["context_proj_bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}, aliases


def export(model, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a 4M checkpoint folder (config.json + model.safetensors)."""
    import json

    out_dir = Path(out_dir)
    cfg = ml4m_config(model.spec)
    tensors, aliases = ml4m_state_dict(model)
    write_safetensors(out_dir / ml4m.WEIGHTS_FILE, tensors, aliases)
    atomic_write(out_dir / ml4m.CONFIG_FILE, [json.dumps(cfg, indent=1, sort_keys=True).encode()])
    return out_dir
