"""Load official 4M (apple/ml-4m) checkpoints: config.json + model.safetensors -> FourM.

    model = fourm.compat.ml4m.load("4M-7_B_CC12M/")        # FourM with 4M's weights
    fourm.compat.ml4m.convert("4M-7_B_CC12M/", "out/")     # native fourm checkpoint

`config.json` is what 4M's `FM.save_pretrained` writes (FM / FourM kwargs). Every key is
understood or rejected: keys FM cannot do without are required, other architecture keys default
to FourM's defaults with a printed notice, training-only keys (drop path, activation
checkpointing) are accepted and ignored, unknown keys are errors.

The state-dict mapping (4M name -> fourm parameter, see `_PLAN`): Linear weights are (out, in) in
4M and (in, out) here; fused qkv / kv / attention projections are reshaped to keep heads as an
axis; per-block tensors are stacked along a leading layer axis. Buffers are checked, not copied:
the sin-cos `pos_emb` tables must equal fourm's own to 5e-5 (float32 rounding) and the LayerNorm bias buffers of the
bias-free variant must be zero. 4M's decoder `token_emb` of image-like targets is never read by
its forward pass (targets are mask tokens) and is dropped by name. Anything else left over, or a
parameter left unfilled, is an error naming it. Shared tensors stored once are resolved through
the file's `__metadata__` alias map, as `safetensors.torch.save_model` writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from fourm import modalities as modreg
from fourm.io import read_json_object
from fourm.modalities import Modality
from fourm.text_layout import ML4M as ML4M_TEXT
from fourm.model.embeddings import fixed_pos_table
from fourm.model.fourm_model import FourM
from fourm.model.pretrained import CheckpointError, assign_params, read_safetensors, save_pretrained
from fourm.model.spec import ModelSpec

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# FM pops these itself (no default anywhere), and without the sizes nothing is defined.
REQUIRED = ("domains_in", "domains_out", "image_size", "patch_size", "norm_bias", "act_layer",
            "dim", "encoder_depth", "decoder_depth", "num_heads")
# FourM.__init__ defaults, used (with a notice) when config.json omits the key.
DEFAULTS = dict(mlp_ratio=4.0, qkv_bias=True, proj_bias=True, mlp_bias=True, gated_mlp=False,
                qk_norm=False, decoder_causal_mask=False, decoder_sep_mask=True,
                num_register_tokens=0, share_modality_embeddings=True)
TRAINING_ONLY = {"drop_path_rate_encoder": 0.0, "drop_path_rate_decoder": 0.0,
                 "shared_drop_path": False, "use_act_checkpoint": False}
# 4M's float32 torch tables vs fourm's: at most ~1 ulp of a sin argument up to 512 (3.05e-5).
POS_TOL = 5e-5
ACTIVATIONS = {"SiLU": "silu", "GELU": "gelu", "ReLU": "relu"}
# Rows of 4M's 1D sin-cos table of every sequence modality: SequenceEncoderEmbedding's
# max_sincos_pos_emb default, which FM never overrides (so it is not in config.json). The
# `pos_emb` buffers in model.safetensors have this many rows; `_pos` checks that.
SEQ_POS_ROWS = 512

# 4M modalities beyond fourm's registry defaults (4M-21 set). Registered on first use, family ml4m.
_EXTRA = [
    Modality("tok_canny_edge@224", "grid", 8192, (14, 14), tokenizer="vq:canny_edge", source="canny_edge"),
    Modality("tok_sam_edge@224", "grid", 8192, (14, 14), tokenizer="vq:sam_edge", source="sam_edge"),
    Modality("tok_dinov2@224", "grid", 8192, (16, 16), tokenizer="vq:dinov2", source="dinov2"),
    Modality("tok_imagebind@224", "grid", 8192, (16, 16), tokenizer="vq:imagebind", source="imagebind"),
    Modality("tok_dinov2_global", "grid", 8192, (4, 4), tokenizer="vq:dinov2_global", source="dinov2_global"),
    Modality("tok_imagebind_global", "grid", 8192, (4, 4), tokenizer="vq:imagebind_global",
             source="imagebind_global"),
    Modality("human_poses", "sequence", 30000, max_length=263, tokenizer="wordpiece:4m", masking="span",
             source="human_poses", text=ML4M_TEXT),
    Modality("color_palette", "sequence", 30000, max_length=23, tokenizer="wordpiece:4m", masking="span",
             source="color_palette", text=ML4M_TEXT),
    Modality("sam_instance", "sequence", 30000, max_length=290, tokenizer="wordpiece:4m", masking="span",
             source="sam_instance", text=ML4M_TEXT),
]
LEARNED_POS = ("tok_dinov2_global", "tok_imagebind_global")  # 4M: sincos_pos_emb=False
UNSUPPORTED = {"t5_caption": "a T5-XXL embedding input (seq_emb) that needs an external T5 encoder"}


def _ensure_registered() -> None:
    known = set(modreg.names("ml4m"))
    for m in _EXTRA:
        if m.name not in known:
            modreg.register(m, "ml4m")


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def read_ml4m_config(src: str | os.PathLike) -> dict:
    path = Path(src) / CONFIG_FILE
    return read_json_object(path, CheckpointError,
                            f"no such file (a 4M checkpoint folder has {CONFIG_FILE} + {WEIGHTS_FILE})")


def spec_from_ml4m(cfg: Mapping[str, Any], source: str = CONFIG_FILE, verbose: bool = True,
                   **runtime) -> ModelSpec:
    """ModelSpec equivalent to a 4M FM config; `runtime` sets fourm-only options (dtype, ...)."""
    _ensure_registered()
    known = set(REQUIRED) | set(DEFAULTS) | set(TRAINING_ONLY)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{source}: unknown 4M config keys {unknown}; known: {sorted(known)}")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise CheckpointError(f"{source}: missing required 4M config keys {missing}")
    defaulted = sorted(set(DEFAULTS) - set(cfg))
    if defaulted and verbose:
        print(f"[fourm.compat.ml4m] {source}: keys not given, using 4M's FourM defaults: "
              + ", ".join(f"{k}={DEFAULTS[k]}" for k in defaulted))
    c = {**DEFAULTS, **cfg}
    if c["act_layer"] not in ACTIVATIONS:
        raise CheckpointError(f"{source}: act_layer={c['act_layer']!r} is not supported; known: {sorted(ACTIVATIONS)}")
    if not c["decoder_sep_mask"]:
        raise CheckpointError(f"{source}: decoder_sep_mask=false is not supported: 4M then lets decoder "
                              "tokens attend across target modalities in a randomly shuffled block order")
    for k in ("domains_in", "domains_out"):
        if not isinstance(c[k], list) or not c[k]:
            raise CheckpointError(f"{source}: {k} must be a non-empty list of modality names, got {c[k]!r}")
    names = sorted(set(c["domains_in"]) | set(c["domains_out"]))  # FM's modality_info order
    mods = []
    for n in names:
        if n in UNSUPPORTED:
            raise CheckpointError(f"{source}: modality {n!r} is not supported: {UNSUPPORTED[n]}")
        try:
            m = modreg.get(n, "ml4m")
        except KeyError as e:
            raise CheckpointError(f"{source}: modality {n!r} is unknown to fourm: {e.args[0]}") from e
        _check_geometry(m, c, source)
        mods.append(m)
    if c["dim"] % c["num_heads"]:
        raise CheckpointError(f"{source}: dim={c['dim']} is not divisible by num_heads={c['num_heads']}")
    model_cfg = dict(
        dim=int(c["dim"]), encoder_depth=int(c["encoder_depth"]), decoder_depth=int(c["decoder_depth"]),
        num_heads=int(c["num_heads"]), mlp_ratio=float(c["mlp_ratio"]), act=ACTIVATIONS[c["act_layer"]],
        gated_mlp=bool(c["gated_mlp"]), qkv_bias=bool(c["qkv_bias"]), proj_bias=bool(c["proj_bias"]),
        mlp_bias=bool(c["mlp_bias"]), norm_bias=bool(c["norm_bias"]), qk_norm=bool(c["qk_norm"]),
        norm_eps=1e-6, num_register_tokens=int(c["num_register_tokens"]),
        share_modality_embeddings=bool(c["share_modality_embeddings"]), tie_output_embeddings=False,
        decoder_causal=bool(c["decoder_causal_mask"]), domains_in=list(c["domains_in"]),
        domains_out=[n for n in c["domains_out"]], seq_pos_len=SEQ_POS_ROWS,
        learned_pos_emb=[n for n in names if n in LEARNED_POS], **runtime)
    no_decoder = [n for n in model_cfg["domains_out"] if modreg.get(n, "ml4m").kind == "pixels"]
    if no_decoder:
        raise CheckpointError(f"{source}: domains_out has pixel modalities {no_decoder}, which 4M cannot decode")
    try:
        return ModelSpec.from_config(model_cfg, mods)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def _check_geometry(m: Modality, c: Mapping[str, Any], source: str) -> None:
    """fourm's registry grid must be what 4M derives for the modality (MODALITY_INFO sizes)."""
    if m.kind == "sequence":
        return
    if "@" in m.name:
        # 4M: input_size from the name's resolution, patch_size 14 for DINOv2/ImageBind, else 16.
        patch = 14 if m.name.split("@")[0] in ("tok_dinov2", "tok_imagebind") else 16
        side = int(m.name.split("@")[1]) // patch
    else:  # *_global tokens: patch 56 over the config's image_size
        side = int(c["image_size"]) // 56
    if (side, side) != tuple(m.grid):
        raise CheckpointError(f"{source}: modality {m.name!r} has a {side}x{side} grid in 4M but "
                              f"{m.grid} in fourm's registry")


# ---------------------------------------------------------------------------------------------
# state dict -> fourm parameters
# ---------------------------------------------------------------------------------------------


class _Tensors:
    """Name lookup that resolves save_model's aliases and records what was consumed."""

    def __init__(self, tensors: dict[str, np.ndarray], aliases: Mapping[str, str], source: str):
        self.t, self.aliases, self.source = tensors, dict(aliases), source
        self.used: set[str] = set()
        self.notes: list[str] = []
        bad = {k: v for k, v in self.aliases.items() if v not in tensors}
        if bad:
            raise CheckpointError(f"{source}: __metadata__ aliases point to tensors not in the file: {bad}")

    def has(self, name: str) -> bool:
        return name in self.t or name in self.aliases

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = name if name in self.t else self.aliases.get(name)
        if key is None:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing (needed for shape {shape})")
        arr = self.t[key]
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"expected {tuple(shape)} from config.json")
        self.used.update({name, key})
        return arr.astype(np.float32) if arr.dtype != np.float32 else arr

    def same_tensor(self, a: str, b: str) -> bool:
        ka = a if a in self.t else self.aliases.get(a)
        kb = b if b in self.t else self.aliases.get(b)
        return ka == kb or (ka in self.t and kb in self.t and np.array_equal(self.t[ka], self.t[kb]))

    def leftovers(self) -> list[str]:
        return sorted(set(self.t) - self.used)


def _linear(t: _Tensors, name: str, din: int, dout: int) -> np.ndarray:
    return t.get(f"{name}.weight", (dout, din)).T


def _block_tensors(t: _Tensors, pre: str, spec: ModelSpec, decoder: bool) -> dict[str, np.ndarray]:
    """fourm param name (inside a block) -> array for one 4M block `pre` (e.g. 'encoder.3')."""
    d, h = spec.dim, spec.num_heads
    hd, f = d // h, spec.mlp_hidden
    out: dict[str, np.ndarray] = {}

    def norm(ours, theirs, dim=d):
        out[f"{ours}/scale"] = t.get(f"{pre}.{theirs}.weight", (dim,))
        _norm_bias(t, f"{pre}.{theirs}.bias", dim, spec, out, f"{ours}/bias")

    def attn(ours, theirs):
        out[f"{ours}/qkv"] = _linear(t, f"{theirs}.qkv", d, 3 * d).reshape(d, 3, h, hd)
        if spec.qkv_bias:
            out[f"{ours}/qkv_bias"] = t.get(f"{theirs}.qkv.bias", (3 * d,)).reshape(3, h, hd)
        out[f"{ours}/proj"] = _linear(t, f"{theirs}.proj", d, d).reshape(h, hd, d)
        if spec.proj_bias:
            out[f"{ours}/proj_bias"] = t.get(f"{theirs}.proj.bias", (d,))
        if spec.qk_norm:
            for qk in ("q_norm", "k_norm"):
                out[f"{ours}/{qk}/scale"] = t.get(f"{theirs}.{qk}.weight", (hd,))
                _norm_bias(t, f"{theirs}.{qk}.bias", hd, spec, out, f"{ours}/{qk}/bias")

    norm("norm1", "norm1")
    if not decoder:
        attn("attn", f"{pre}.attn")
    else:
        attn("self_attn", f"{pre}.self_attn")
        norm("query_norm", "query_norm")
        norm("context_norm", "context_norm")
        ca = f"{pre}.cross_attn"
        out["cross_attn/q"] = _linear(t, f"{ca}.q", d, d).reshape(d, h, hd)
        out["cross_attn/kv"] = _linear(t, f"{ca}.kv", d, 2 * d).reshape(d, 2, h, hd)
        out["cross_attn/proj"] = _linear(t, f"{ca}.proj", d, d).reshape(h, hd, d)
        if spec.qkv_bias:
            out["cross_attn/q_bias"] = t.get(f"{ca}.q.bias", (d,)).reshape(h, hd)
            out["cross_attn/kv_bias"] = t.get(f"{ca}.kv.bias", (2 * d,)).reshape(2, h, hd)
        if spec.proj_bias:
            out["cross_attn/proj_bias"] = t.get(f"{ca}.proj.bias", (d,))
        if spec.qk_norm:
            for qk in ("q_norm", "k_norm"):
                out[f"cross_attn/{qk}/scale"] = t.get(f"{ca}.{qk}.weight", (hd,))
                _norm_bias(t, f"{ca}.{qk}.bias", hd, spec, out, f"cross_attn/{qk}/bias")
    norm("norm2", "norm2")
    fcs = ("fc1", "fc2", "fc3") if spec.gated_mlp else ("fc1", "fc2")
    for fc in fcs:
        din, dout = (f, d) if fc == "fc2" else (d, f)
        out[f"mlp/{fc}"] = _linear(t, f"{pre}.mlp.{fc}", din, dout)
        if spec.mlp_bias:
            out[f"mlp/{fc}_bias"] = t.get(f"{pre}.mlp.{fc}.bias", (dout,))
    return out


def _norm_bias(t: _Tensors, name: str, dim: int, spec: ModelSpec, out: dict, ours: str) -> None:
    if spec.norm_bias:
        out[ours] = t.get(name, (dim,))
    elif t.has(name):  # bias-free LayerNorm: 4M stores a zero buffer; check it, keep nothing
        if np.any(t.get(name, (dim,)) != 0):
            raise CheckpointError(f"{t.source}: {name!r} is non-zero but config.json says norm_bias=false")


def _pos(t: _Tensors, name: str, m: Modality, spec: ModelSpec, learned: bool, out: dict, ours: str) -> None:
    rows = m.num_tokens if m.kind != "sequence" else spec.seq_pos_len
    if learned:
        out[ours] = t.get(name, (1, m.num_tokens, spec.dim))[0]
        return
    if not t.has(name):
        return  # a missing fixed buffer is fine: fourm computes it
    stored = t.get(name, (1, rows, spec.dim))[0]
    ours_table = fixed_pos_table(m, spec.dim, spec.seq_pos_len)[:rows]
    diff = float(np.max(np.abs(stored - ours_table)))
    if diff > POS_TOL:
        raise CheckpointError(f"{t.source}: buffer {name!r} differs from fourm's sin-cos table by {diff:.3g} "
                              f"(position convention mismatch?)")


def convert_state_dict(tensors: dict[str, np.ndarray], aliases: Mapping[str, str], spec: ModelSpec,
                       source: str = WEIGHTS_FILE) -> tuple[dict[str, np.ndarray], list[str]]:
    """({fourm param path: array}, notes). Raises on any unmatched tensor or parameter."""
    t = _Tensors(tensors, aliases, source)
    d = spec.dim
    out: dict[str, np.ndarray] = {"mask_token": t.get("mask_token", (1, 1, d))[0, 0]}
    if spec.num_register_tokens:
        out["registers"] = t.get("register_tokens", (1, spec.num_register_tokens, d))[0]
    for n in spec.domains_in:
        m, pre = spec.modality(n), f"encoder_embeddings.{n}"
        learned = n in spec.learned_pos_emb
        out[f"mod_emb/{n}"] = t.get(f"{pre}.mod_emb", (1, 1, d))[0, 0]
        if m.kind == "pixels":
            ppc = m.patch_size * m.patch_size * m.channels
            out[f"enc_embed/{n}/proj"] = _linear(t, f"{pre}.proj", ppc, d)
        else:
            out[f"enc_embed/{n}/token_emb"] = t.get(f"{pre}.token_emb.weight", (m.vocab_size, d))
        _pos(t, f"{pre}.pos_emb", m, spec, learned, out, f"enc_embed/{n}/pos")
    for n in spec.domains_out:
        m, pre = spec.modality(n), f"decoder_embeddings.{n}"
        learned = n in spec.learned_pos_emb
        shared = spec.share_modality_embeddings and n in spec.domains_in
        if shared:
            if not t.same_tensor(f"{pre}.mod_emb", f"encoder_embeddings.{n}.mod_emb"):
                raise CheckpointError(f"{source}: share_modality_embeddings=true but {pre}.mod_emb differs "
                                      f"from encoder_embeddings.{n}.mod_emb")
            t.get(f"{pre}.mod_emb", (1, 1, d))
        else:
            out[f"dec_mod_emb/{n}"] = t.get(f"{pre}.mod_emb", (1, 1, d))[0, 0]
        out[f"dec_embed/{n}/to_logits"] = t.get(f"{pre}.to_logits.weight", (m.vocab_size, d))
        if m.kind == "sequence":
            out[f"dec_embed/{n}/token_emb"] = t.get(f"{pre}.token_emb.weight", (m.vocab_size, d))
        elif t.has(f"{pre}.token_emb.weight"):
            t.get(f"{pre}.token_emb.weight", (m.vocab_size, d))
            t.notes.append(f"dropped {pre}.token_emb.weight: 4M's forward never reads it (image targets "
                           "are mask tokens)")
        _pos(t, f"{pre}.pos_emb", m, spec, learned, out, f"dec_embed/{n}/pos")
    for side, depth, decoder in (("encoder", spec.encoder_depth, False), ("decoder", spec.decoder_depth, True)):
        blocks = [_block_tensors(t, f"{side}.{i}", spec, decoder) for i in range(depth)]
        for k in blocks[0]:
            out[f"{side}/{k}"] = np.stack([b[k] for b in blocks])
        out[f"{side}_norm/scale"] = t.get(f"{side}_norm.weight", (d,))
        _norm_bias(t, f"{side}_norm.bias", d, spec, out, f"{side}_norm/bias")
    out["context_proj"] = _linear(t, "decoder_proj_context", d, d)
    out["context_proj_bias"] = t.get("decoder_proj_context.bias", (d,))
    left = t.leftovers()
    if left:
        raise CheckpointError(f"{source}: tensors not used by the conversion (unexpected for this "
                              f"config.json): {left}")
    return out, t.notes


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def load(src: str | os.PathLike, verbose: bool = False, **runtime) -> FourM:
    """FourM with the weights of a 4M checkpoint folder (config.json + model.safetensors)."""
    src = Path(src)
    cfg = read_ml4m_config(src)
    spec = spec_from_ml4m(cfg, str(src / CONFIG_FILE), verbose=verbose, **runtime)
    tensors, meta = read_safetensors(src / WEIGHTS_FILE)
    params, notes = convert_state_dict(tensors, meta, spec, str(src / WEIGHTS_FILE))
    check_finite(params, str(src / WEIGHTS_FILE))
    if verbose:
        for n in notes:
            print(f"[fourm.compat.ml4m] {n}")
    model = nnx.eval_shape(lambda: FourM(spec, rngs=nnx.Rngs(0)))
    assign_params(model, params, f"{src / WEIGHTS_FILE} (converted)")
    return model


def check_finite(params: Mapping[str, np.ndarray], source: str) -> None:
    """CheckpointError naming the first parameter with NaN/Inf values (a corrupt or diverged
    checkpoint would otherwise convert into a model that generates garbage)."""
    for name, value in params.items():
        a = np.asarray(value)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a.astype(np.float32))))
            if bad:
                raise CheckpointError(f"{source}: parameter {name!r} has {bad} non-finite (NaN/Inf) "
                                      f"values of {a.size}; expected finite weights")


def convert(src: str | os.PathLike, out: str | os.PathLike, verbose: bool = True,
            overwrite: bool = False) -> Path:
    """Write a native fourm checkpoint (fourm.model.load_pretrained reads it) for a 4M folder.
    An existing, non-empty `out` is an error unless `overwrite`; nothing is written on error."""
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise CheckpointError(f"OUT_DIR {out} exists and is not empty; pass --overwrite to replace "
                              "its checkpoint")
    model = load(src, verbose=verbose)
    cfg = read_ml4m_config(src)
    return save_pretrained(model, {"converted_from": str(Path(src).resolve()), "ml4m_config": cfg}, out)
