"""4M tokenizers in fourm's exported-tokenizer artifact (`fourm-export-tokenizer`, format
`fourm.image_tokenizer`): the same files (config.json, weights.npz, encode/decode.jaxexport,
README.md) and the same use with only jax + numpy; `fourm.tokenizers.load` reads it back.

What differs from fourm's own tokenizers is recorded in config.json: `family: "ml4m"`, the 4M
class and config.json (`ml4m_class`, `ml4m_config`), the resolved architecture sizes (`archs`,
so names such as a fixture's `vit_t_enc` need no registration to load), and 4M's array
conventions: encode takes what 4M's `tokenize` takes (float32 NCHW, or int32 class ids (B, H, W)),
returns int32 tokens (B, h, w) or (B, num_codebooks, h, w); decode returns 4M's float32 NCHW
output. weights.npz keeps 4M's state-dict names (the serialized functions convert them).
Only VQVAE is exportable: a DiVAE decodes by sampling (noise, scheduler) and is not a fixed
function of its tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fourm.compat.ml4m_tokenizers import vqvae
from fourm.compat.ml4m_tokenizers.config import VIT_ARCHS, ViTArch, parse_config, register_vit
from fourm.compat.ml4m_tokenizers.load import WEIGHTS_FILE, Tokenizer, expected_state, to_params
from fourm.compat.ml4m_tokenizers.load import load as load_folder
from fourm.tokenizers.image import FORMAT_VERSION, weights_digest

FAMILY = "ml4m"


def flat_weights(tok: Tokenizer) -> dict[str, np.ndarray]:
    """The inference tensors under 4M's names (the codebook's EMA statistics are left out)."""
    return {k: tok.state[k] for k in expected_state(tok.cfg)}


def io_shapes(tok: Tokenizer, input_hw=None) -> tuple[tuple, tuple]:
    """(input shape after the batch, token grid (h, w)) of the exported functions."""
    c = tok.cfg
    if c.enc_vit and c.patch_proj:
        hw = tuple(input_hw or (c.enc_resolution, c.enc_resolution))
        grid = (hw[0] // c.patch_size, hw[1] // c.patch_size)
    else:  # feature maps (ViT without patch projection) or MLP: one token per input position
        hw = tuple(input_hw or (c.enc_grid if c.enc_vit else (1, 1)))
        grid = hw
    x_shape = hw if c.n_labels is not None else (c.n_channels, *hw)
    return x_shape, grid


def check_exportable(tok: Tokenizer) -> None:
    if tok.cfg.cls != "VQVAE":
        raise ValueError(f"{tok.name}: only 4M VQVAE tokenizers export; a {tok.cfg.cls} decodes by diffusion "
                         "sampling (noise + scheduler), not a fixed function of its tokens")


def exported_functions(tok: Tokenizer, platforms, input_hw=None):
    check_exportable(tok)
    c = tok.cfg
    x_shape, grid = io_shapes(tok, input_hw)
    (b,) = jax.export.symbolic_shape("b")
    w_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_weights(tok).items()}
    x_spec = jax.ShapeDtypeStruct((b, *x_shape), jnp.int32 if c.n_labels is not None else jnp.float32)
    tok_shape = (b, *grid) if c.num_codebooks == 1 else (b, c.num_codebooks, *grid)
    t_spec = jax.ShapeDtypeStruct(tok_shape, jnp.int32)

    def encode(w, x):
        return vqvae.tokenize(to_params(w, c), x, c).astype(jnp.int32)

    def decode(w, t):
        return vqvae.decode_tokens(to_params(w, c), t, c)

    enc = jax.export.export(jax.jit(encode), platforms=platforms)(w_spec, x_spec)
    dec = jax.export.export(jax.jit(decode), platforms=platforms)(w_spec, t_spec)
    return enc, dec, x_shape, grid


def artifact_spec(tok: Tokenizer, x_shape, grid, platforms, modality: str = "") -> dict:
    c = tok.cfg
    digest = weights_digest(flat_weights(tok))
    archs = {k: dataclasses.asdict(a) for k, a in ((c.enc_type, c.enc_arch), (c.dec_type, c.dec_arch))
             if isinstance(a, ViTArch)}
    tok_shape = ["b", *grid] if c.num_codebooks == 1 else ["b", c.num_codebooks, *grid]
    x_dtype = "int32" if c.n_labels is not None else "float32"
    x_note = (f"class ids in [0, {c.n_labels})" if c.n_labels is not None else
              "ImageNet-standardised RGB (4M undo_std)" if c.undo_std else
              "4M's input convention for this tokenizer (RGB tokenizers: [-1, 1]; features as extracted)")
    return {
        "format_version": FORMAT_VERSION, "family": FAMILY, "name": tok.name,
        "modality": modality or tok.raw_config.get("domain") or tok.name,
        "version": f"{tok.name}:ml4m:{digest[:8]}", "weights_digest": digest, "vocab_size": c.codebook_size,
        "num_codebooks": c.num_codebooks, "resolution": c.enc_resolution, "grid": list(grid),
        "ml4m_class": c.cls, "ml4m_config": tok.raw_config, "archs": archs, "platforms": list(platforms),
        "jax_version": jax.__version__,
        "input": {"shape": ["b", *x_shape], "dtype": x_dtype, "layout": "4M (NCHW)", "note": x_note},
        "normalisation": {"kind": "ml4m", "undo_std": c.undo_std},
        "encode": {"file": "encode.jaxexport", "args": ["weights", "x"],
                   "x": {"shape": ["b", *x_shape], "dtype": x_dtype},
                   "returns": {"shape": tok_shape, "dtype": "int32"}},
        "decode": {"file": "decode.jaxexport", "args": ["weights", "tokens"],
                   "tokens": {"shape": tok_shape, "dtype": "int32", "range": [0, c.codebook_size - 1]},
                   "returns": {"shape": ["b", c.out_channels, "H", "W"],
                               "dtype": "float32 (class logits)" if c.n_labels is not None else "float32"}},
    }


def from_export(path: Path, spec: Mapping, flat: Mapping[str, np.ndarray]) -> Tokenizer:
    """An exported 4M artifact -> Tokenizer (the stored architecture sizes are registered)."""
    for name, arch in (spec.get("archs") or {}).items():
        if VIT_ARCHS.get(name) != ViTArch(**arch):
            register_vit(name, ViTArch(**arch))
    cfg = parse_config(spec["ml4m_config"], spec["ml4m_class"], source=f"{path}/config.json ml4m_config")
    tok = Tokenizer(cfg, dict(flat), name=spec.get("name", ""), raw_config=spec["ml4m_config"],
                    source=f"{path}/weights.npz")
    digest = weights_digest(flat_weights(tok))
    if digest != spec.get("weights_digest"):
        raise ValueError(f"{path}: config.json weights_digest {spec.get('weights_digest')!r} but weights.npz "
                         f"gives {digest!r} (mismatched artifact)")
    tok.path, tok.version = str(path), spec.get("version")
    return tok


def readme(spec: dict) -> str:
    enc, dec = spec["encode"], spec["decode"]
    return f"""# {spec['name']}: a 4M {spec['ml4m_class']} tokenizer exported by fourm

Format {spec.get('format')} v{spec['format_version']}, family ml4m. Needs only `jax` and `numpy`
(and `flatbuffers`, which `jax.export.deserialize` imports; no fourm, no torch).
Arrays follow 4M's conventions (NCHW); weights.npz keeps 4M's state-dict names.

- input  x: {enc['x']['dtype']}{enc['x']['shape']}  ({spec['input']['note']})
- tokens:   int32{enc['returns']['shape']}, ids in [0, {spec['vocab_size']})
- decode returns {dec['returns']['dtype']}{dec['returns']['shape']}
- platforms: {', '.join(spec['platforms'])}

```python
import numpy as np, jax
d = "path/to/this/directory"
w = dict(np.load(f"{{d}}/weights.npz", allow_pickle=False))
encode = jax.export.deserialize(open(f"{{d}}/encode.jaxexport", "rb").read())
decode = jax.export.deserialize(open(f"{{d}}/decode.jaxexport", "rb").read())
tokens = np.asarray(encode.call(w, x))      # x: a batch as above
recon = np.asarray(decode.call(w, tokens))  # check 0 <= tokens < vocab_size first
```
"""
