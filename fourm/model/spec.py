"""`ModelSpec`: the resolved, hashable model configuration (config.model + modality list).

NNX keeps non-array module attributes in the static graph definition, so the model holds this
frozen dataclass rather than a mutable ConfigDict. `ModelSpec.from_config` validates the config
(unknown keys, impossible sizes, unknown modalities) with errors that name the offending field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from fourm import modalities as modreg
from fourm.modalities import Modality
from fourm.model.sizes import mlp_hidden_dim

# config.model keys that only matter before the spec exists (size table lookups, registry).
_CONFIG_ONLY = {"size", "variant", "family", "modalities", "vocab_overrides", "mlp_ratio"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    modalities: tuple[Modality, ...]
    domains_in: tuple[str, ...]
    domains_out: tuple[str, ...]
    dim: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int
    mlp_hidden: int
    act: str = "silu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    num_register_tokens: int = 0
    share_modality_embeddings: bool = True
    tie_output_embeddings: bool = False
    decoder_causal: bool = False
    init_std: float = 0.02
    learned_pos_emb: tuple[str, ...] = ()
    seq_pos_len: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "dots_no_batch"
    scan_layers: bool = True
    attention_impl: str = ""
    head_impl: str = ""  # "" = per backend (fourm.model.fourm_model.head_impl)
    head_chunk: int = 128
    loss_type: str = "mod"

    # -- derived -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"modality {name!r} is not in this model; its modalities: {list(self.names)}")
        return self.names.index(name)

    def modality(self, name: str) -> Modality:
        return self.modalities[self.index(name)]

    @property
    def inputs(self) -> tuple[int, ...]:
        return tuple(self.index(n) for n in self.domains_in)

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(self.index(n) for n in self.domains_out)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], modalities: Sequence[Modality] | None = None
                    ) -> "ModelSpec":
        """Spec from `config.model` (+ the modality list; default: resolve cfg.modalities)."""
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields - _CONFIG_ONLY - {"mlp_hidden"})
        if unknown:
            raise KeyError(f"config.model has unknown keys {unknown}; known: {sorted(fields | _CONFIG_ONLY)}")
        for key in ("dim", "encoder_depth", "decoder_depth", "num_heads"):
            if key not in cfg:
                raise KeyError(f"config.model.{key} is missing")
        if modalities is None:
            if not cfg.get("modalities"):
                raise KeyError("config.model.modalities is empty and no modality list was given")
            modalities = modreg.resolve(list(cfg["modalities"]), cfg.get("family", "fourm"),
                                        dict(cfg.get("vocab_overrides") or {}))
        modalities = tuple(modalities)
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names in {names}")
        dom_in = tuple(cfg.get("domains_in") or names)
        dom_out = tuple(cfg.get("domains_out") or [m.name for m in modalities if m.kind != "pixels"])
        for side, dom in (("domains_in", dom_in), ("domains_out", dom_out)):
            missing = [n for n in dom if n not in names]
            if missing:
                raise KeyError(f"config.model.{side} names {missing}, which are not among the "
                               f"model's modalities {names}")
        for n in dom_out:
            if modalities[names.index(n)].kind == "pixels":
                raise ValueError(f"config.model.domains_out: {n!r} is a pixel modality (input only)")
        gated = bool(cfg.get("gated_mlp", True))
        hidden = int(cfg.get("mlp_hidden") or 0) or mlp_hidden_dim(
            int(cfg["dim"]), float(cfg.get("mlp_ratio", 4.0)), gated)
        kw = {k: v for k, v in cfg.items() if k in fields and k not in (
            "modalities", "domains_in", "domains_out", "mlp_hidden", "dtype", "param_dtype",
            "learned_pos_emb")}
        spec = cls(modalities=modalities, domains_in=dom_in, domains_out=dom_out, mlp_hidden=hidden,
                   dtype=jnp.dtype(cfg.get("dtype", "float32")),
                   param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")),
                   learned_pos_emb=tuple(cfg.get("learned_pos_emb") or ()), **kw)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"config.model.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        for m in self.modalities:
            if m.kind == "grid" and self.dim % 4 and m.name not in self.learned_pos_emb:
                raise ValueError(f"config.model.dim={self.dim} must be divisible by 4 for the 2D "
                                 f"sin-cos position table of {m.name!r}")
            if m.kind != "pixels" and m.vocab_size <= 0:
                raise ValueError(f"modality {m.name!r} has no vocabulary size")
        bad = [n for n in self.learned_pos_emb if n not in self.names]
        if bad:
            raise KeyError(f"config.model.learned_pos_emb names unknown modalities {bad}")
        if self.act not in ("silu", "gelu", "gelu_tanh", "relu"):
            raise ValueError(f"config.model.act={self.act!r}; known: silu, gelu, gelu_tanh, relu")
        if self.loss_type not in ("mod", "token"):
            raise ValueError(f"config.model.loss_type={self.loss_type!r}; known: mod, token")
        if self.head_impl not in ("", "chunked", "dense"):
            raise ValueError(f"config.model.head_impl={self.head_impl!r}; known: chunked, dense "
                             f"(or empty: chosen per backend)")
        if self.attention_impl not in ("", "xla", "cudnn", "jax"):
            raise ValueError(f"config.model.attention_impl={self.attention_impl!r}; known: xla, "
                             f"cudnn, jax (or empty: chosen per backend)")
        if self.head_chunk <= 0:
            raise ValueError(f"config.model.head_chunk must be positive, got {self.head_chunk}")

    def to_config(self) -> dict:
        """JSON-able dict that `from_config(d, modalities)` turns back into this spec."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("modalities")
        d["modalities"] = list(self.names)
        d["domains_in"], d["domains_out"] = list(self.domains_in), list(self.domains_out)
        d["learned_pos_emb"] = list(self.learned_pos_emb)
        d["dtype"], d["param_dtype"] = jnp.dtype(self.dtype).name, jnp.dtype(self.param_dtype).name
        return d
