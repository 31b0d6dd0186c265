"""Export a trained image-like tokenizer as a self-contained directory, and load it back.

    OUT_DIR/
      config.json        format, format_version, version, modality, resolution, grid, vocab_size,
                         normalisation, input/output contracts, the tokenizer config, digests
                         (4M tokenizers: family "ml4m", their class, config and 4M's array layouts)
      weights.npz        inference weights, flat "encoder/stem/kernel"-style keys (no pickle)
      encode.jaxexport   jax.export: encode(weights, x[b, H, W(, C)]) -> int32 tokens[b, gh, gw]
      decode.jaxexport   jax.export: decode(weights, int32 tokens[b, gh, gw]) -> native arrays
      README.md          how to use it with only jax and numpy

The serialized functions have a symbolic batch dimension and carry everything else (network,
normalisation, quantizer), so a program with only `jax` and `numpy` (plus `flatbuffers`, which
`jax.export` deserialization imports) can tokenize and detokenize:

    import json, numpy as np, jax
    w = dict(np.load("OUT_DIR/weights.npz", allow_pickle=False))
    enc = jax.export.deserialize(open("OUT_DIR/encode.jaxexport", "rb").read())
    tokens = enc.call(w, images)

The directory appears atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fourm.compat.ml4m_tokenizers import artifact as ml4m_artifact
from fourm.io import inside
from fourm.tokenizers.image import (FORMAT_VERSION, ImageTokenizer, abstract_model, make_pure_fns,
                                    unflatten_into)
from fourm.tokenizers.runs import from_run

FORMAT = "fourm.image_tokenizer"
FILES = ("config.json", "weights.npz", "encode.jaxexport", "decode.jaxexport")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
NATIVE_DTYPES = {"image": np.uint8, "depth": np.float32, "normals": np.float32,
                 "classes": np.int32}


def _exported_fns(tok: ImageTokenizer, platforms):
    cfg = tok.cfg
    enc, dec = make_pure_fns(cfg)
    _, _, abstract, _ = abstract_model(cfg)
    flat = tok.flat_weights()

    def encode(weights, x):
        return enc(unflatten_into(abstract, weights, "weights"), x)[0]

    def decode(weights, ids):
        return dec(unflatten_into(abstract, weights, "weights"), ids)

    w_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    (b,) = jax.export.symbolic_shape("b")
    res, (gh, gw) = tok.resolution, tok.grid
    tail = (tok.codec.native_channels,) if tok.codec.native_channels else ()
    x_spec = jax.ShapeDtypeStruct((b, res, res) + tail, NATIVE_DTYPES[tok.codec.kind])
    ids_spec = jax.ShapeDtypeStruct((b, gh, gw), jnp.int32)
    e = jax.export.export(jax.jit(encode), platforms=platforms)(w_spec, x_spec)
    d = jax.export.export(jax.jit(decode), platforms=platforms)(w_spec, ids_spec)
    return e, d


def _fourm_parts(tok: ImageTokenizer, platforms):
    """(encode, decode, config.json dict, weights, README) of one of fourm's own tokenizers."""
    enc, dec = _exported_fns(tok, platforms)
    spec = tok.spec()
    kind = tok.codec.kind
    spec.update(
        format=FORMAT, platforms=list(platforms), resize_input=tok.resize_input,
        jax_version=jax.__version__,
        encode={"file": "encode.jaxexport", "args": ["weights", "x"],
                "x": {"shape": ["b", tok.resolution, tok.resolution] +
                      ([tok.codec.native_channels] if tok.codec.native_channels else []),
                      "dtype": np.dtype(NATIVE_DTYPES[kind]).name},
                "returns": {"shape": ["b", *tok.grid], "dtype": "int32"}},
        decode={"file": "decode.jaxexport", "args": ["weights", "tokens"],
                "tokens": {"shape": ["b", *tok.grid], "dtype": "int32",
                           "range": [0, tok.vocab_size - 1]},
                "returns": {"dtype": {"image": "uint8", "depth": "float32 metres",
                                      "normals": "float32 unit vectors",
                                      "classes": "int32 class ids"}[kind]}},
    )
    return enc, dec, spec, tok.flat_weights(), _readme(spec)


def _ml4m_parts(tok: ml4m_artifact.Tokenizer, platforms, input_hw=None):
    """The same artifact for a 4M tokenizer (fourm.compat.ml4m_tokenizers; family "ml4m")."""
    enc, dec, x_shape, grid = ml4m_artifact.exported_functions(tok, platforms, input_hw)
    spec = ml4m_artifact.artifact_spec(tok, x_shape, grid, platforms)
    spec["format"] = FORMAT
    return enc, dec, spec, ml4m_artifact.flat_weights(tok), ml4m_artifact.readme(spec)


def export(tok, out_dir, *, platforms=None, overwrite: bool = False, input_hw=None) -> Path:
    """Write `tok` (an `ImageTokenizer`, or a 4M tokenizer from `fourm.compat.ml4m_tokenizers`) as
    an artifact directory `out_dir` (atomically). Returns its path.

    `platforms`: what the serialized functions are lowered for; default cpu + cuda + tpu, falling
    back to cpu alone (with a warning) if this jaxlib cannot lower for the others. Platforms named
    explicitly must all succeed. `input_hw`: 4M tokenizers only, the input's spatial size
    (default: the trained resolution; MLP tokenizers 1 x 1)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    if isinstance(tok, ml4m_artifact.Tokenizer):
        ml4m_artifact.check_exportable(tok)  # before any work

        def parts(p):
            return _ml4m_parts(tok, p, input_hw)
    else:
        def parts(p):
            return _fourm_parts(tok, p)
    if platforms:
        platforms = tuple(platforms)
        enc, dec, spec, weights, readme = parts(platforms)
    else:
        platforms = DEFAULT_PLATFORMS
        try:
            enc, dec, spec, weights, readme = parts(platforms)
        except Exception as e:  # a backend's lowering may be unavailable on this jaxlib
            print(f"warning: export for {platforms} failed ({type(e).__name__}: {e}); "
                  "exporting for cpu only")
            platforms = ("cpu",)
            enc, dec, spec, weights, readme = parts(platforms)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        with open(tmp / "weights.npz", "wb") as f:
            np.savez(f, **weights)
        (tmp / "encode.jaxexport").write_bytes(enc.serialize())
        (tmp / "decode.jaxexport").write_bytes(dec.serialize())
        (tmp / "README.md").write_text(readme)
        (tmp / "config.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        os.chmod(tmp, 0o755)
        if out_dir.exists():  # overwrite: swap in the new directory, then drop the old one
            old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_export(path):
    """An exported artifact as an `ImageTokenizer` (weights checked against the config), or, for
    family "ml4m", as a 4M tokenizer (`fourm.compat.ml4m_tokenizers.load.Tokenizer`)."""
    path = Path(path)
    missing = [f for f in FILES if not inside(path, f, "tokenizer export file").exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete tokenizer export: missing {missing}")
    spec = json.loads((path / "config.json").read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json: format is {spec.get('format')!r}, expected {FORMAT!r}")
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}/config.json: format_version {spec.get('format_version')!r} is not "
                         f"supported by this fourm (expects {FORMAT_VERSION}); re-export the "
                         "tokenizer with a matching fourm version")
    with np.load(path / "weights.npz", allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    if spec.get("family", "fourm") == ml4m_artifact.FAMILY:
        return ml4m_artifact.from_export(path, spec, flat)
    import ml_collections

    cfg = ml_collections.ConfigDict(spec["tokenizer_config"])
    cfg.resize_input = bool(spec.get("resize_input", False))
    tok = ImageTokenizer(cfg, flat, step=spec.get("step"), source=str(path / "weights.npz"))
    for key in ("config_hash", "weights_digest", "vocab_size"):
        if spec.get(key) != getattr(tok, key):
            raise ValueError(f"{path}: config.json {key} = {spec.get(key)!r} but the weights and "
                             f"tokenizer config give {getattr(tok, key)!r} (mismatched artifact)")
    if list(spec.get("grid", [])) != list(tok.grid) or spec.get("resolution") != tok.resolution:
        raise ValueError(f"{path}: config.json grid/resolution {spec.get('grid')}/"
                         f"{spec.get('resolution')} contradict its tokenizer config "
                         f"{list(tok.grid)}/{tok.resolution}")
    tok.path = str(path)
    return tok


def load(path):
    """`fourm.tokenizers.load`: an exported artifact, the latest checkpoint of a training run, or a
    4M tokenizer folder (config.json + model.safetensors)."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "weights.npz").exists():
        return load_export(path)
    if (path / "checkpoints").is_dir():
        tok = from_run(path)
        tok.path = str(path)
        return tok
    if (path / "config.json").exists() and (path / ml4m_artifact.WEIGHTS_FILE).exists():
        tok = ml4m_artifact.load_folder(path)  # a 4M tokenizer folder, as released
        tok.path = str(path)
        return tok
    raise FileNotFoundError(f"{path} is neither a tokenizer export (config.json + weights.npz), "
                            "a tokenizer training run (checkpoints/) nor a 4M tokenizer folder "
                            "(config.json + model.safetensors)")


def peek_name(path) -> str | None:
    """The name (`tok_depth@64`) of the fourm tokenizer `load(path)` would return, read from its
    config.json alone (no weights, no model); None for anything else (a 4M folder, no config)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("family", "fourm") != "fourm":
        return None
    if (path / "weights.npz").exists() and cfg.get("format") == FORMAT:  # an export
        name = cfg.get("name")
    elif (path / "checkpoints").is_dir():  # a training run: `<name>@<resolution>`, as ImageTokenizer
        name = f"{cfg['name']}@{cfg['resolution']}" if "name" in cfg and "resolution" in cfg else None
    else:
        return None
    return name if isinstance(name, str) else None


def _readme(spec: dict) -> str:
    enc, dec = spec["encode"], spec["decode"]
    return f"""# {spec['name']} tokenizer ({spec['version']})

Exported by fourm (format {spec['format']} v{spec['format_version']}). Needs only `jax` and `numpy`
(and `flatbuffers`, which `jax.export.deserialize` imports; no fourm).

- input  x: {enc['x']['dtype']}{enc['x']['shape']}  ({spec['input']['dtype']})
- tokens:   int32{enc['returns']['shape']}, ids in [0, {spec['vocab_size']})
- decode returns {dec['returns']['dtype']}
- normalisation: {json.dumps(spec['normalisation'])}
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
