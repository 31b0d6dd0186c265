"""4M tokenizer configs: every config.json key, the architecture-size table, validation.

    cfg = parse_config(json.load(open("config.json")), "VQVAE", source="tok/config.json")

4M's `VQ` / `VQVAE` / `DiVAE` constructors take the keys below (`save_pretrained` writes all of
them into config.json). Keys that shape the inference computation or the weights are required;
training-only keys (EMA codebook updates, dead-code restarts, dropout, checkpoint surgery) are
accepted and have no effect here, as are the metadata 4M's tooling attaches (`domain`, and
`model_type`, which names the class); anything else is an error naming the key, since 4M's
`**kwargs` would silently swallow a misspelt one.

Architecture names resolve through one table: `vit_{s,b,l}_{enc,dec}` (4M's presets) plus any
registered with `register_vit` (e.g. the fixtures' `vit_t_enc` / `vit_t_dec`, see
`FIXTURE_VITS`). `BottleneckMLP/B_<blocks>-Wi_<width>[-X_<expansion>]` and `MLP/...` ids are
parsed as 4M's `build_mlp` parses them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fourm.model.pretrained import CheckpointError

CLASSES = ("VQVAE", "DiVAE")


class TokenizerConfigError(CheckpointError):
    """A 4M tokenizer config that cannot be loaded (names the key and what was expected)."""


# ---------------------------------------------------------------------------------------------
# architecture table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViTArch:
    """4M's ViTEncoder / ViTDecoder sizes (every preset: mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6)."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class MLPArch:
    """4M's `build_mlp` ids: BottleneckMLP (pre-LN residual bottleneck blocks) or MLP (LN + linear)."""

    kind: str  # "BottleneckMLP" | "MLP"
    num_blocks: int
    width: int
    expansion: int = 4

    @property
    def dim(self) -> int:
        return self.width


_VIT_PRESETS = {"vit_s": ViTArch(512, 8, 8), "vit_b": ViTArch(768, 12, 12), "vit_l": ViTArch(1024, 24, 16)}
VIT_ARCHS: dict[str, ViTArch] = {f"{k}_{role}": v for k, v in _VIT_PRESETS.items() for role in ("enc", "dec")}

# The tiny names the tokenizer fixtures (../shared/fixtures/ml4m/tokenizers/*/README.md) register in
# ml-4m before building their models; not part of ml-4m. Tests and `check-tokenizer` register them.
FIXTURE_VITS = {"vit_t_enc": ViTArch(64, 2, 2), "vit_t_dec": ViTArch(64, 2, 2)}


def register_vit(name: str, arch: ViTArch) -> None:
    """Add a ViT size under `name` (`..._enc` or `..._dec`); re-registering the same size is a no-op."""
    if "vit" not in name or not name.endswith(("_enc", "_dec")):
        raise ValueError(f"ViT architecture name {name!r} must contain 'vit' and end in _enc or _dec "
                         "(4M picks the ViT family by 'vit' in enc_type / dec_type)")
    old = VIT_ARCHS.get(name)
    if old is not None and old != arch:
        raise ValueError(f"ViT architecture {name!r} is already registered as {old}, not {arch}")
    if arch.dim % 4 or arch.dim % arch.num_heads:
        raise ValueError(f"ViT architecture {name!r}: dim {arch.dim} must be divisible by 4 (2D sin-cos "
                         f"position embedding) and by num_heads {arch.num_heads}")
    VIT_ARCHS[name] = arch


def register_fixture_archs() -> None:
    for name, arch in FIXTURE_VITS.items():
        register_vit(name, arch)


def parse_mlp(model_id: str, key: str = "enc_type") -> MLPArch:
    """`BottleneckMLP/B_6-Wi_1024` -> MLPArch; parsed as ml-4m's build_mlp does (a third '-'
    field sets the expansion factor, default 4)."""
    try:
        model, architecture = model_id.split("/")
        if model not in ("BottleneckMLP", "MLP"):
            raise ValueError
        sep = architecture.split("-")
        num_blocks = int(sep[0].split("_")[1])
        width = int(sep[1].split("_")[1])
        expansion = int(sep[2].split("_")[1]) if len(sep) == 3 else 4
    except (ValueError, IndexError):
        raise TokenizerConfigError(
            f"{key}={model_id!r} is not a 4M MLP id; expected 'BottleneckMLP/B_<blocks>-Wi_<width>"
            "[-<name>_<expansion>]' or 'MLP/B_<blocks>-Wi_<width>'") from None
    if num_blocks < 1 or width < 1 or expansion < 1:
        raise TokenizerConfigError(f"{key}={model_id!r}: blocks, width and expansion must be >= 1")
    return MLPArch(model, num_blocks, width, expansion)


def resolve_arch(name: Any, role: str, key: str) -> ViTArch | MLPArch:
    """4M's dispatch: 'vit' in the name -> a ViT preset of that name, 'MLP' in it -> build_mlp."""
    if not isinstance(name, str):
        raise TokenizerConfigError(f"{key} must be a string, got {name!r}")
    if "vit" in name:
        if name not in VIT_ARCHS or not name.endswith(f"_{role}"):
            known = sorted(k for k in VIT_ARCHS if k.endswith(f"_{role}"))
            raise TokenizerConfigError(
                f"{key}={name!r} is not a known ViT {role}oder size; known: {known} (register others with "
                "fourm.compat.ml4m_tokenizers.config.register_vit)")
        return VIT_ARCHS[name]
    if "MLP" in name:
        return parse_mlp(name, key)
    raise TokenizerConfigError(f"{key}={name!r}: 4M builds {role}oders only for 'vit_*' and '*MLP/*' ids")


# ---------------------------------------------------------------------------------------------
# config keys
# ---------------------------------------------------------------------------------------------

# key -> accepted types (None = JSON null allowed). Shared by every class (4M's VQ).
VQ_KEYS: dict[str, tuple] = {
    "image_size": (int,), "image_size_enc": (int, None), "n_channels": (int,), "n_labels": (int, None),
    "enc_type": (str,), "patch_proj": (bool,), "post_mlp": (bool,), "patch_size": (int,),
    "quant_type": (str,), "codebook_size": (int,), "num_codebooks": (int,), "latent_dim": (int,),
    "norm_codes": (bool,), "norm_latents": (bool,), "undo_std": (bool,),
}
VQ_TRAINING_KEYS = ("sync_codebook", "ema_decay", "threshold_ema_dead_code", "code_replacement_policy",
                    "commitment_weight", "kmeans_init", "ckpt_path", "ignore_keys", "freeze_enc")
CLASS_KEYS: dict[str, dict[str, tuple]] = {
    "VQVAE": {"dec_type": (str,), "out_conv": (bool,), "image_size_dec": (int, None),
              "patch_size_dec": (int, None)},
    "DiVAE": {"dec_type": (str,), "image_size_dec": (int, None), "num_train_timesteps": (int,),
              "scheduler": (str,), "beta_schedule": (str,), "prediction_type": (str,), "clip_sample": (bool,),
              "thresholding": (bool,), "zero_terminal_snr": (bool,), "conditioning": (str,)},
}
CLASS_TRAINING_KEYS = {"VQVAE": (), "DiVAE": ("cls_free_guidance_dropout", "masked_cfg", "masked_cfg_low",
                                              "masked_cfg_high", "dec_transformer_dropout")}
DIFFUSION_KEYS = tuple(k for k in CLASS_KEYS["DiVAE"] if k not in ("dec_type", "image_size_dec"))
# 4M's VQControlNet (a Stable Diffusion ControlNet decoder): recognised, not supported.
# Metadata 4M's tokenizer tooling attaches (get_image_tokenizer: args.domain, args.model_type).
METADATA_KEYS: dict[str, tuple] = {"domain": (str, None), "model_type": (str,)}
CONTROLNET_KEYS = ("sd_path", "image_size_sd", "pretrained_cn", "enable_xformer", "adapter")
QUANT_TYPES = ("lucid", "memcodes")
SCHEDULERS = ("ddpm", "ddim")
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


def known_keys(cls: str) -> set[str]:
    return (set(VQ_KEYS) | set(VQ_TRAINING_KEYS) | set(CLASS_KEYS[cls]) | set(CLASS_TRAINING_KEYS[cls])
            | set(METADATA_KEYS))


def infer_class(raw: Mapping[str, Any], source: str = "config.json") -> str:
    """4M's config.json does not name its class (the caller picks VQVAE/DiVAE.from_pretrained);
    the class-specific keys tell them apart."""
    if "model_type" in raw:  # named explicitly (4M's get_image_tokenizer records it this way)
        if raw["model_type"] not in CLASSES:
            raise TokenizerConfigError(f"{source}: model_type={raw['model_type']!r} is not a supported 4M tokenizer "
                                       f"class; supported: {list(CLASSES)}")
        return raw["model_type"]
    if any(k in raw for k in CONTROLNET_KEYS):
        raise TokenizerConfigError(f"{source}: a 4M VQControlNet tokenizer (keys "
                                   f"{sorted(k for k in CONTROLNET_KEYS if k in raw)}); its Stable Diffusion "
                                   f"decoder is not supported; supported classes: {list(CLASSES)}")
    divae = [k for k in DIFFUSION_KEYS if k in raw]
    return "DiVAE" if divae else "VQVAE"


def _type_ok(v, types) -> bool:
    for t in types:
        if t is None and v is None:
            return True
        if t is int and isinstance(v, int) and not isinstance(v, bool):
            return True
        if t is bool and isinstance(v, bool):
            return True
        if t is str and isinstance(v, str):
            return True
    return False


def _type_name(types) -> str:
    return " or ".join("null" if t is None else t.__name__ for t in types)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """A validated 4M tokenizer config (hashable: the static argument of the jitted functions)."""

    cls: str
    image_size: int
    image_size_enc: int | None
    n_channels: int
    n_labels: int | None
    enc_type: str
    patch_proj: bool
    post_mlp: bool
    patch_size: int
    quant_type: str
    codebook_size: int
    num_codebooks: int
    latent_dim: int
    norm_codes: bool
    norm_latents: bool
    undo_std: bool
    dec_type: str
    image_size_dec: int | None
    enc_arch: ViTArch | MLPArch
    dec_arch: ViTArch | MLPArch | None  # None: DiVAE (its UNet lives in fourm...diffusion)
    out_conv: bool = False
    patch_size_dec: int | None = None
    diffusion: tuple = ()  # DiVAE: sorted (key, value) pairs of DIFFUSION_KEYS

    # -- derived sizes, as 4M's constructors derive them ----------------------------------------
    @property
    def enc_resolution(self) -> int:
        return self.image_size_enc or self.image_size

    @property
    def dec_resolution(self) -> int:
        return self.image_size_dec or self.image_size

    @property
    def dec_patch_size(self) -> int:
        return self.patch_size_dec or self.patch_size

    @property
    def out_channels(self) -> int:
        return self.n_channels if self.n_labels is None else self.n_labels

    @property
    def enc_vit(self) -> bool:
        return isinstance(self.enc_arch, ViTArch)

    @property
    def dec_vit(self) -> bool:
        return isinstance(self.dec_arch, ViTArch)

    @property
    def enc_grid(self) -> tuple[int, int]:
        """The encoder's stored position-embedding grid (ViT), i.e. the trained token grid."""
        n = self.enc_resolution // self.patch_size
        return (n, n)

    @property
    def dec_grid(self) -> tuple[int, int]:
        n = self.dec_resolution // self.dec_patch_size
        return (n, n)

    @property
    def diffusion_cfg(self) -> dict:
        return dict(self.diffusion)


def parse_config(raw: Mapping[str, Any], cls: str | None = None, source: str = "config.json") -> TokenizerConfig:
    """Validate a 4M tokenizer config.json (dict) for class `cls` (default: inferred)."""
    if not isinstance(raw, Mapping):
        raise TokenizerConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    named = infer_class(raw, source) if "model_type" in raw else None
    if cls and named and cls != named:
        raise TokenizerConfigError(f"{source}: model_type={named!r} contradicts the requested class {cls!r}")
    cls = cls or infer_class(raw, source)
    if cls not in CLASSES:
        raise TokenizerConfigError(f"{source}: unknown 4M tokenizer class {cls!r}; supported: {list(CLASSES)}")
    unknown = sorted(set(raw) - known_keys(cls))
    if unknown:
        raise TokenizerConfigError(f"{source}: unknown key(s) {unknown} for a 4M {cls}; known: "
                                   f"{sorted(known_keys(cls))}")
    typed = {**VQ_KEYS, **CLASS_KEYS[cls]}
    missing = [k for k in typed if k not in raw]
    if missing:
        raise TokenizerConfigError(f"{source}: missing key(s) {missing} (a 4M {cls} config.json lists every "
                                   "constructor argument)")
    for k, types in {**typed, **{k: t for k, t in METADATA_KEYS.items() if k in raw}}.items():
        if not _type_ok(raw[k], types):
            raise TokenizerConfigError(f"{source}: {k} must be {_type_name(types)}, got {raw[k]!r}")
    c = dict(raw)

    def positive(*keys):
        for k in keys:
            if c[k] is not None and c[k] < 1:
                raise TokenizerConfigError(f"{source}: {k} must be >= 1, got {c[k]}")

    positive("image_size", "image_size_enc", "n_channels", "n_labels", "patch_size", "codebook_size",
             "num_codebooks", "latent_dim", "image_size_dec", *(["patch_size_dec"] if cls == "VQVAE" else []))
    if c["quant_type"] not in QUANT_TYPES:
        raise TokenizerConfigError(f"{source}: quant_type={c['quant_type']!r} is not one of {list(QUANT_TYPES)}")
    if c["quant_type"] == "memcodes" and c["latent_dim"] % c["num_codebooks"]:
        raise TokenizerConfigError(f"{source}: memcodes splits latent_dim={c['latent_dim']} over num_codebooks="
                                   f"{c['num_codebooks']} heads; it must divide evenly")
    if c["undo_std"] and c["n_labels"] is not None:
        raise TokenizerConfigError(f"{source}: undo_std=true (RGB input) contradicts n_labels={c['n_labels']} "
                                   "(class-id input)")
    if c["undo_std"] and c["n_channels"] != 3:
        raise TokenizerConfigError(f"{source}: undo_std=true undoes ImageNet RGB standardisation and needs "
                                   f"n_channels=3, got {c['n_channels']}")
    enc_arch = _arch(c["enc_type"], "enc", "enc_type", source)
    fields = dict(cls=cls, **{k: c[k] for k in VQ_KEYS}, dec_type=c["dec_type"],
                  image_size_dec=c["image_size_dec"], enc_arch=enc_arch)
    if cls == "VQVAE":
        fields.update(dec_arch=_arch(c["dec_type"], "dec", "dec_type", source), out_conv=c["out_conv"],
                      patch_size_dec=c["patch_size_dec"])
    else:
        if "unet_" not in c["dec_type"]:
            raise TokenizerConfigError(f"{source}: dec_type={c['dec_type']!r}: only 4M's patched UNet "
                                       "decoders ('unet_*') are supported for DiVAE (not UViT)")
        if c["scheduler"] not in SCHEDULERS:
            raise TokenizerConfigError(f"{source}: scheduler={c['scheduler']!r} is not one of {list(SCHEDULERS)}")
        if c["prediction_type"] not in PREDICTION_TYPES:
            raise TokenizerConfigError(f"{source}: prediction_type={c['prediction_type']!r} is not one of "
                                       f"{list(PREDICTION_TYPES)}")
        positive("num_train_timesteps")
        fields.update(dec_arch=None, diffusion=tuple(sorted((k, c[k]) for k in DIFFUSION_KEYS)))
    cfg = TokenizerConfig(**fields)
    _check_grids(cfg, source)
    return cfg


def _arch(name, role, key, source):
    try:
        return resolve_arch(name, role, key)
    except TokenizerConfigError as e:
        raise TokenizerConfigError(f"{source}: {e}") from None


def _check_grids(cfg: TokenizerConfig, source: str) -> None:
    for arch, res, patch, what in ((cfg.enc_arch, cfg.enc_resolution, cfg.patch_size, "encoder"),
                                   (cfg.dec_arch, cfg.dec_resolution, cfg.dec_patch_size, "decoder")):
        if isinstance(arch, ViTArch) and res % patch:
            raise TokenizerConfigError(f"{source}: ViT {what} resolution {res} is not divisible by its patch "
                                       f"size {patch}")
