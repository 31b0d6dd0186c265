"""Load a 4M tokenizer folder (config.json + model.safetensors, as 4M's `save_pretrained` and the
released `EPFL-VILAB/4M_tokenizers_*` lay it out) into a `Tokenizer`.

    tok = load("4M_tokenizers_semseg_4k_224/")      # class inferred from config.json keys
    tokens = tok.tokenize(x)                         # numpy in, numpy out; inputs checked first
    decoded = tok.decode_tokens(tokens)

Every tensor of the state dict is accounted for: the names and shapes 4M's modules would have
for this config (`expected_state`) must all be present with those shapes; the EMA statistics of
the lucid codebook (`initted`, `cluster_size`, `embed_avg`) are training-only and ignored;
anything else is an error naming it. A DiVAE's `decoder.*` tensors go to its diffusion decoder.
The weights are read with `safetensors` (numpy), converted once (`to_params`: Linear weights to
(in, out), convs to matrices / HWIO) and then only read by the pure functions in `vqvae.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from fourm.compat.ml4m_tokenizers import diffusion, unet, vqvae
from fourm.compat.ml4m_tokenizers.config import (MLPArch, TokenizerConfig, TokenizerConfigError, ViTArch,
                                                 parse_config)
from fourm.io import read_json_object

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TRAINING_BUFFERS = ("quantize._codebook.initted", "quantize._codebook.cluster_size",
                    "quantize._codebook.embed_avg")
DECODER_PREFIX = "decoder."



# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    return read_json_object(path, TokenizerConfigError,
                            f"no such file (a 4M tokenizer folder has {CONFIG_FILE} + {WEIGHTS_FILE})")


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as numpy; aliases that torch's save_model records in
    __metadata__ (tensors shared under two names) are resolved."""
    if not path.is_file():
        raise TokenizerConfigError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise TokenizerConfigError(f"{path}: cannot read safetensors file "
                                   f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    for alias, name in meta.items():
        if alias not in tensors and name in tensors:
            tensors[alias] = tensors[name]
    return tensors


# ---------------------------------------------------------------------------------------------
# state dict: expected names and shapes, conversion to params
# ---------------------------------------------------------------------------------------------


def _linear_shapes(name, n_in, n_out):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _norm_shapes(name, d):
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def _vit_shapes(pre, arch: ViTArch, grid, post_mlp):
    d, hid = arch.dim, arch.mlp_hidden
    s = {f"{pre}pos_emb": (1, d, *grid)}
    for i in range(arch.depth):
        b = f"{pre}blocks.{i}."
        s.update({**_norm_shapes(b + "norm1", d), **_linear_shapes(b + "attn.qkv", d, 3 * d),
                  **_linear_shapes(b + "attn.proj", d, d), **_norm_shapes(b + "norm2", d),
                  **_linear_shapes(b + "mlp.fc1", d, hid), **_linear_shapes(b + "mlp.fc2", hid, d)})
    if post_mlp:
        s.update({**_norm_shapes(f"{pre}norm_mlp", d), **_linear_shapes(f"{pre}post_mlp.fc1", d, hid),
                  **_linear_shapes(f"{pre}post_mlp.fc2", hid, d)})
    return s


def _mlp_shapes(pre, arch: MLPArch, dim_in, dim_out):
    w = arch.width
    s = {**_linear_shapes(f"{pre}linear_in", dim_in, w), **_linear_shapes(f"{pre}linear_out", w, dim_out)}
    if arch.kind == "BottleneckMLP":
        for i in range(arch.num_blocks):
            s.update({**_linear_shapes(f"{pre}blocks.{i}.block.0", w, w * arch.expansion),
                      **_linear_shapes(f"{pre}blocks.{i}.block.2", w * arch.expansion, w),
                      **_norm_shapes(f"{pre}layernorms.{i}", w)})
    else:
        for i in range(arch.num_blocks - 1):
            s.update({**_linear_shapes(f"{pre}layers.{i}", w, w), **_norm_shapes(f"{pre}layernorms.{i}", w)})
    return s


def expected_state(cfg: TokenizerConfig) -> dict[str, tuple]:
    """Every tensor name -> shape that 4M's model of this config has (DiVAE: without its UNet)."""
    s: dict[str, tuple] = {}
    if cfg.n_labels is not None:
        s["cls_emb.weight"] = (cfg.n_labels, cfg.n_channels)
    enc = cfg.enc_arch
    if cfg.enc_vit:
        kernel = (cfg.patch_size, cfg.patch_size) if cfg.patch_proj else (1, 1)
        s.update(_vit_shapes("encoder.", enc, cfg.enc_grid, cfg.post_mlp))
        s.update({"encoder.proj.weight": (enc.dim, cfg.n_channels, *kernel), "encoder.proj.bias": (enc.dim,)})
    else:
        s.update(_mlp_shapes("encoder.", enc, cfg.n_channels, enc.width))
    s.update({"quant_proj.weight": (cfg.latent_dim, enc.dim, 1, 1), "quant_proj.bias": (cfg.latent_dim,)})
    heads, lat = cfg.num_codebooks, cfg.latent_dim
    if cfg.quant_type == "lucid":
        s["quantize._codebook.embed"] = (cfg.codebook_size, lat)
        if heads > 1:
            s.update({**_linear_shapes("quantize.project_in", lat, lat * heads),
                      **_linear_shapes("quantize.project_out", lat * heads, lat)})
    else:
        dh = lat // heads
        s.update({"quantize.codes": (heads, cfg.codebook_size, dh), "quantize.to_k.weight": (heads, dh, dh),
                  "quantize.to_v.weight": (heads, dh, dh)})
    dec = cfg.dec_arch
    if cfg.cls == "VQVAE":
        s.update({"post_quant_proj.weight": (dec.dim, lat, 1, 1), "post_quant_proj.bias": (dec.dim,)})
        if cfg.dec_vit:
            out, ps = cfg.out_channels, cfg.dec_patch_size if cfg.patch_proj else 1
            s.update(_vit_shapes("decoder.", dec, cfg.dec_grid, cfg.post_mlp))
            s.update(_linear_shapes("decoder.out_proj", dec.dim, out * ps * ps))
            if cfg.out_conv:
                for i in range(2):
                    b = f"decoder.out_conv.{i}."
                    s.update({b + "dwconv.weight": (out, 1, 7, 7), b + "dwconv.bias": (out,),
                              **_norm_shapes(b + "norm", out), **_linear_shapes(b + "pwconv1", out, 4 * out),
                              **_linear_shapes(b + "pwconv2", 4 * out, out), b + "gamma": (out,)})
        else:
            s.update(_mlp_shapes("decoder.", dec, dec.width, cfg.out_channels))
    return s


def check_state(tensors: Mapping[str, Any], cfg: TokenizerConfig, source: str) -> None:
    """Missing, unexpected or mis-shaped tensors -> one error line naming them."""
    want = expected_state(cfg)
    ours = {k for k in tensors if not (cfg.cls == "DiVAE" and k.startswith(DECODER_PREFIX))}
    missing = sorted(set(want) - ours)
    extra = sorted(ours - set(want) - set(TRAINING_BUFFERS))
    bad = [f"{k} has shape {list(np.shape(tensors[k]))}, expected {list(want[k])}"
           for k in sorted(set(want) & ours) if tuple(np.shape(tensors[k])) != tuple(want[k])]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected tensor(s) {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    problems += bad[:6]
    initted = tensors.get("quantize._codebook.initted")
    if initted is not None and not np.all(np.asarray(initted)):
        problems.append("quantize._codebook.initted is 0: the codebook was never initialised (4M would k-means "
                        "it from the first batch it sees)")
    if problems:
        raise TokenizerConfigError(f"{source}: does not fit the 4M {cfg.cls} of its config.json: "
                                   + "; ".join(problems))


def _lin(s, name):
    return {"w": s[f"{name}.weight"].reshape(s[f"{name}.weight"].shape[0], -1).T, "b": s[f"{name}.bias"]}


def _norm(s, name):
    return {"w": s[f"{name}.weight"], "b": s[f"{name}.bias"]}


def _vit_params(s, pre, arch: ViTArch, post_mlp):
    p = {"pos_emb": s[f"{pre}pos_emb"][0], "blocks": []}
    for i in range(arch.depth):
        b = f"{pre}blocks.{i}."
        p["blocks"].append({"norm1": _norm(s, b + "norm1"), "norm2": _norm(s, b + "norm2"),
                            "attn": {"qkv": _lin(s, b + "attn.qkv"), "proj": _lin(s, b + "attn.proj")},
                            "mlp": {"fc1": _lin(s, b + "mlp.fc1"), "fc2": _lin(s, b + "mlp.fc2")}})
    if post_mlp:
        p["norm_mlp"] = _norm(s, f"{pre}norm_mlp")
        p["post_mlp"] = {"fc1": _lin(s, f"{pre}post_mlp.fc1"), "fc2": _lin(s, f"{pre}post_mlp.fc2")}
    return p


def _mlp_params(s, pre, arch: MLPArch):
    p = {"linear_in": _lin(s, f"{pre}linear_in"), "linear_out": _lin(s, f"{pre}linear_out")}
    if arch.kind == "BottleneckMLP":
        p["blocks"] = [{"norm": _norm(s, f"{pre}layernorms.{i}"), "fc1": _lin(s, f"{pre}blocks.{i}.block.0"),
                        "fc2": _lin(s, f"{pre}blocks.{i}.block.2")} for i in range(arch.num_blocks)]
    else:
        p["layers"] = [{"norm": _norm(s, f"{pre}layernorms.{i}"), "linear": _lin(s, f"{pre}layers.{i}")}
                       for i in range(arch.num_blocks - 1)]
    return p


def to_params(s: Mapping[str, Any], cfg: TokenizerConfig) -> dict:
    """4M state dict (names as in model.safetensors) -> the params pytree of `vqvae.py`. Only
    reshapes and transposes, so it also runs on traced arrays (exported artifacts keep 4M's names)."""
    p: dict[str, Any] = {}
    if cfg.n_labels is not None:
        p["cls_emb"] = s["cls_emb.weight"]
    if cfg.enc_vit:
        p["encoder"] = _vit_params(s, "encoder.", cfg.enc_arch, cfg.post_mlp)
        p["encoder"]["proj"] = _lin(s, "encoder.proj")  # conv (D, C, P, P) -> (C*P*P, D), (c, ph, pw) order
    else:
        p["encoder"] = _mlp_params(s, "encoder.", cfg.enc_arch)
    p["quant_proj"] = _lin(s, "quant_proj")
    if cfg.quant_type == "lucid":
        q = {"embed": s["quantize._codebook.embed"]}
        if cfg.num_codebooks > 1:
            q.update(project_in=_lin(s, "quantize.project_in"), project_out=_lin(s, "quantize.project_out"))
    else:
        q = {"codes": s["quantize.codes"], "to_k": s["quantize.to_k.weight"], "to_v": s["quantize.to_v.weight"]}
    p["quantize"] = q
    if cfg.cls == "VQVAE":
        p["post_quant_proj"] = _lin(s, "post_quant_proj")
        if cfg.dec_vit:
            d = _vit_params(s, "decoder.", cfg.dec_arch, cfg.post_mlp)
            d["out_proj"] = _lin(s, "decoder.out_proj")
            if cfg.out_conv:
                d["out_conv"] = [{"dwconv": {"w": s[f"decoder.out_conv.{i}.dwconv.weight"].transpose(2, 3, 1, 0),
                                             "b": s[f"decoder.out_conv.{i}.dwconv.bias"]},
                                  "norm": _norm(s, f"decoder.out_conv.{i}.norm"),
                                  "pwconv1": _lin(s, f"decoder.out_conv.{i}.pwconv1"),
                                  "pwconv2": _lin(s, f"decoder.out_conv.{i}.pwconv2"),
                                  "gamma": s[f"decoder.out_conv.{i}.gamma"]} for i in range(2)]
            p["decoder"] = d
        else:
            p["decoder"] = _mlp_params(s, "decoder.", cfg.dec_arch)
    return p


# ---------------------------------------------------------------------------------------------
# the runtime object
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A loaded 4M tokenizer: numpy in / numpy out around the jitted pure functions of `vqvae.py`.

    Inputs follow 4M's conventions: float (B, n_channels, H, W) (RGB in [-1, 1], or ImageNet-
    standardised when undo_std), int class ids (B, H, W) for semantic segmentation, feature maps
    (B, C, h, w) for feature tokenizers (patch_proj off / MLP). They are checked before any work
    (shape, channels, dtype, class-id range; ViT patch inputs must be multiples of the patch
    size, and other sizes than the trained one get 4M's interpolated position embeddings).
    """

    kind = "grid"  # fourm.tokenizer_protocol

    def __init__(self, cfg: TokenizerConfig, state: Mapping[str, np.ndarray], *, name: str = "",
                 raw_config: Mapping[str, Any] | None = None, source: str = ""):
        self.cfg, self.name, self.source = cfg, name or cfg.cls, source
        self.raw_config = dict(raw_config or {})
        check_state(state, cfg, source or "weights")
        # Computation is float32 as in the reference; half-precision files are widened once here.
        self.state = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                      else np.asarray(v) for k, v in state.items()}
        self.params = jax.tree.map(jnp.asarray, to_params(self.state, cfg))
        self.decoder_params = None
        if cfg.cls == "DiVAE" and unet is not None:  # the UNet loader checks the decoder.* tensors
            self.decoder_params = jax.tree.map(jnp.asarray, unet.load_decoder_params(self.state, self.raw_config))
        self.vocab_size = cfg.codebook_size
        self.num_codebooks = cfg.num_codebooks

    def __repr__(self):
        c = self.cfg
        return (f"Tokenizer({self.name}: 4M {c.cls}, {c.enc_type} -> {c.quant_type} "
                f"{c.num_codebooks}x{c.codebook_size} -> {c.dec_type})")

    # -- checks ------------------------------------------------------------------------------
    def check_input(self, x) -> np.ndarray:
        c = self.cfg
        x = np.asarray(x)
        got = f"{x.dtype}{list(x.shape)}"
        mult = c.patch_size if c.enc_vit and c.patch_proj else 1
        size_note = f" with H, W multiples of the patch size {mult}" if mult > 1 else ""
        if c.n_labels is not None:
            if x.ndim != 3 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"{self.name}: expected class ids int[B, H, W]{size_note}, got {got}")
            if x.size and (x.min() < 0 or x.max() >= c.n_labels):
                raise ValueError(f"{self.name}: class ids must be in [0, {c.n_labels}), got min {int(x.min())}, "
                                 f"max {int(x.max())}")
            spatial = x.shape[1:]
        else:
            if x.ndim != 4 or x.shape[1] != c.n_channels or not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"{self.name}: expected float[B, {c.n_channels}, H, W]{size_note} (NCHW), got {got}")
            spatial = x.shape[2:]
        if x.shape[0] == 0 or any(s == 0 or s % mult for s in spatial):
            raise ValueError(f"{self.name}: expected a non-empty batch{size_note}, got {got}")
        return x.astype(np.int32) if c.n_labels is not None else x.astype(np.float32)

    def check_tokens(self, tokens) -> np.ndarray:
        c = self.cfg
        t = np.asarray(tokens)
        want = "[B, h, w]" if c.num_codebooks == 1 else f"[B, {c.num_codebooks}, h, w]"
        if not np.issubdtype(t.dtype, np.integer) or t.ndim != (3 if c.num_codebooks == 1 else 4) or \
                (c.num_codebooks > 1 and t.shape[1] != c.num_codebooks) or 0 in t.shape:
            raise ValueError(f"{self.name}: expected token ids int{want}, got {t.dtype}{list(t.shape)}")
        if t.min() < 0 or t.max() >= c.codebook_size:
            raise ValueError(f"{self.name}: token ids must be in [0, {c.codebook_size}), got min {int(t.min())}, "
                             f"max {int(t.max())}")
        return t.astype(np.int32)

    # -- calls -------------------------------------------------------------------------------
    def encode(self, x) -> tuple[np.ndarray, np.ndarray]:
        """4M's `encode` (without the loss): (quant float32 (B, latent_dim, h, w), tokens int32)."""
        quant, tokens = vqvae.encode_jit(self.params, self.check_input(x), cfg=self.cfg)
        return np.asarray(quant), np.asarray(tokens)

    def tokenize(self, x) -> np.ndarray:
        return np.asarray(vqvae.tokenize_jit(self.params, self.check_input(x), cfg=self.cfg))

    def tokens_to_embedding(self, tokens) -> np.ndarray:
        return np.asarray(vqvae.tokens_to_embedding_jit(self.params, self.check_tokens(tokens), cfg=self.cfg))

    def decode_tokens(self, tokens, **kwargs) -> np.ndarray:
        """VQVAE: (B, out_channels, H, W) float32. DiVAE: the diffusion decoder; `kwargs` go to it."""
        tokens = self.check_tokens(tokens)
        if self.cfg.cls == "VQVAE":
            if kwargs:
                raise TypeError(f"{self.name}: a VQVAE decodes without options, got {sorted(kwargs)}")
            return np.asarray(vqvae.decode_tokens_jit(self.params, tokens, cfg=self.cfg))
        return diffusion_decode(self, self.tokens_to_embedding(tokens), **kwargs)


def diffusion_decode(tok: Tokenizer, quant, *, timesteps=None, noise=None, key=None, mode: str = "trailing",
                     image_size: int | None = None, **kwargs) -> np.ndarray:
    """DiVAE `decode_quant`: `timesteps` is a number of steps (default: num_train_timesteps, as 4M)
    spaced by `mode` as 4M's scheduler does, or the explicit timestep array; `noise` the initial
    x_T (default: drawn from `key`). Other kwargs (eta, step_noise, key) go to `diffusion.decode`."""
    cfg = tok.raw_config
    if timesteps is None or np.ndim(timesteps) == 0:
        steps = int(timesteps or tok.cfg.diffusion_cfg["num_train_timesteps"])
        timesteps = diffusion.scheduler_timesteps(cfg, steps, mode)
        # 'trailing' with a count that does not divide num_train_timesteps yields one extra entry;
        # the step to the previous timestep still follows the requested count, as in 4M.
        kwargs.setdefault("num_inference_steps", steps)
    if noise is None:
        if key is None:
            raise ValueError(f"{tok.name}: DiVAE decoding starts from noise: pass noise= (B, C, H, W) or "
                             "key=jax.random.key(seed)")
        noise = diffusion.initial_noise(key, cfg, np.shape(quant)[0], image_size)
    out = diffusion.decode(tok.decoder_params, quant, noise=noise, timesteps=np.asarray(timesteps), cfg=cfg,
                           key=key, **kwargs)
    return np.asarray(out)


def load(folder, cls: str | None = None, name: str | None = None) -> Tokenizer:
    """A 4M tokenizer folder -> Tokenizer. `cls` (VQVAE | DiVAE) overrides the class inferred from
    the config keys (4M's config.json does not record it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerConfigError(f"{folder}: no such tokenizer folder")
    raw = read_config(folder)
    cfg = parse_config(raw, cls, source=str(folder / CONFIG_FILE))
    tensors = read_weights(folder / WEIGHTS_FILE)
    return Tokenizer(cfg, tensors, name=name or folder.name, raw_config=raw, source=str(folder / WEIGHTS_FILE))
