"""`fourm-features`: encoder features of images (and other inputs) from a fourm or official 4M
checkpoint, and retrieval by predicted global embeddings (4M-21's DINOv2 / ImageBind globals).

    fourm-features --checkpoint 4M-21_B_CC12M --image a.jpg --image b.jpg --out feats.npz
    fourm-features --checkpoint DIR --image a.jpg --cond caption="a dog on a sofa" --out feats.npz
    fourm-features --checkpoint 4M-21_B_CC12M --tokenizers 4m_tokenizers --global_embedding dinov2_global \\
        --image g1.jpg --image g2.jpg --image g3.jpg --query q.jpg --top 2 --out retrieval

Writes OUT (a .npz) with `tokens` (B, N, D: the encoder output after encoder_norm per input token,
4M's FMViT features), `valid` (B, N), `pooled` (B, D: mean over valid tokens), `images` (the
files, in order) and `slice/<modality>` ([start, stop) of each input along N). With --global_embedding, OUT
is a folder: features.npz as above plus `global` (B, C) for the --image files, and with --query
also retrieval.json (per query: the --top closest --image files by cosine similarity).
Images are prepared as the model's input expects (4M checkpoints: 4M's center crop + bicubic
resize, ImageNet normalisation); --cond adds the same other input to every image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from absl import app, flags

from fourm.cli import CommandError, entry, positive
from fourm.cli import generate as gen_cli


def define_flags(fv, argv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "fourm checkpoint or official 4M checkpoint folder", **d)
    flags.DEFINE_string("tokenizers", None, "tokenizer folder (4M: 4M_tokenizers_* folders + the WordPiece "
                        "JSON); needed for --global_embedding and for non-image inputs given natively or as text", **d)
    flags.DEFINE_multi_string("image", [], "an image file (repeatable): one sample each", **d)
    flags.DEFINE_multi_string("cond", [], "another input NAME=VALUE for every image (repeatable), as "
                              "fourm-generate's --cond", **d)
    flags.DEFINE_string("global_embedding", None, "retrieval: the predicted global embedding to use (dinov2_global "
                        "or imagebind_global; needs a 4M-21 model and that tokenizer)", **d)
    flags.DEFINE_multi_string("query", [], "retrieval: query image (repeatable); ranks the --image files", **d)
    flags.DEFINE_integer("top", 5, "retrieval: results per query", **d)
    flags.DEFINE_integer("seed", 0, "retrieval: sampling seed of the global-token prediction", **d)
    flags.DEFINE_string("out", None, "output .npz (features) or folder (with --global_embedding)", **d)


def _images(files, res: int, ml4m: bool, mod):
    """The image files as one uint8 batch at the model's size (4M: its crop + resize; fourm: bicubic
    resize, as fourm-generate does)."""
    import numpy as np

    from fourm.generate.inputs import resize_images

    out = []
    for f in files:
        x = gen_cli.read_condition(mod, str(f), res, ml4m)
        out.append(x if x.shape[:2] == (res, res) else resize_images(x[None], res, res)[0])
    return np.stack(out)


def run(argv, F) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np

    from fourm import features
    from fourm.compat import ml4m_assets
    from fourm.data.folder import atomic_write_bytes
    from fourm.generate.chain import Generator
    from fourm.generate.inputs import needing_tokenizer

    if not F.checkpoint:
        raise CommandError("--checkpoint is required")
    if not F.image:
        raise CommandError("--image is required (one or more image files)")
    if not F.out:
        raise CommandError("--out is required")
    positive("--top", F.top)
    if F.query and not F.global_embedding:
        raise CommandError("--query needs --global_embedding (dinov2_global or imagebind_global)")
    for f in list(F.image) + list(F.query):
        if not Path(f).is_file():
            raise CommandError(f"--image/--query {f}: no such file")
    ml4m = gen_cli.is_ml4m(F.checkpoint)
    model = gen_cli.load_model(F.checkpoint)
    spec = model.spec
    glob = F.global_embedding
    if glob:
        features.global_modality(spec, glob)  # a clear error before any work
    pix = next((m for m in spec.modalities if m.kind == "pixels" and m.name in spec.domains_in), None)
    if pix is None:
        raise CommandError(f"--checkpoint {F.checkpoint}: the model takes no pixel input (inputs: "
                           f"{list(spec.domains_in)})")
    res = pix.grid[0] * pix.patch_size
    other = {}
    for item in F.cond:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--cond {item!r}: expected NAME=VALUE")
        name = gen_cli.resolve_name(spec, key.strip(), "condition")
        other[name] = gen_cli.read_condition(spec.modality(name), value, res, ml4m)
    images = _images(F.image, res, ml4m, pix)
    needed = needing_tokenizer(spec, other)
    if glob:
        needed.append(features.global_modality(spec, glob))
    toks = {}
    if needed and not F.tokenizers:
        raise CommandError(f"--tokenizers is required for {needed}")
    if needed:
        toks = (ml4m_assets.load_tokenizers(F.tokenizers, spec, needed, seed=F.seed) if ml4m
                else gen_cli.load_tokenizers(F.tokenizers, set(needed)))
    inputs = {pix.name: images, **{n: _batched(v, len(images)) for n, v in other.items()}}
    f = features.encoder_features(model, inputs, toks)
    arrays = {"tokens": np.asarray(f.tokens), "valid": np.asarray(f.valid), "pooled": np.asarray(f.pooled),
              "images": np.asarray([str(p) for p in F.image]),
              **{f"slice/{n}": np.asarray(s) for n, s in features.slices(spec, f).items()}}
    out = Path(F.out)
    if not glob:
        _write_npz(out, arrays, atomic_write_bytes)
        print(f"wrote {out}: tokens {list(f.tokens.shape)}, pooled {list(f.pooled.shape)}")
        return 0
    gen = Generator(model, toks)
    gvec = features.predicted_global(gen, inputs, glob, seed=F.seed)
    arrays["global"] = gvec
    result = None
    if F.query:
        q_inputs = {pix.name: _images(F.query, res, ml4m, pix),
                    **{n: _batched(v, len(F.query)) for n, v in other.items()}}
        qvec = features.predicted_global(gen, q_inputs, glob, seed=F.seed)
        idx, score = features.retrieve(qvec, gvec, F.top)
        result = [{"query": str(q), "results": [{"image": str(F.image[i]), "cosine": float(s)}
                                                for i, s in zip(ix, sc)]}
                  for q, ix, sc in zip(F.query, idx, score)]
    out.mkdir(parents=True, exist_ok=True)
    _write_npz(out / "features.npz", arrays, atomic_write_bytes)
    if result is not None:
        atomic_write_bytes(out / "retrieval.json", json.dumps(result, indent=1).encode())
        for r in result:
            print(f"{r['query']}: " + ", ".join(f"{x['image']} ({x['cosine']:.3f})" for x in r["results"]))
    print(f"wrote {out}: features.npz (tokens {list(f.tokens.shape)}, global {list(gvec.shape)})"
          + (", retrieval.json" if result is not None else ""))
    return 0


def _batched(value, n: int):
    """One condition value for each of n images (text repeated; arrays broadcast by the generator)."""
    return [value] * n if isinstance(value, str) else value


def _write_npz(path: Path, arrays, write) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write(path, buf.getvalue())


main = entry(__name__)

if __name__ == "__main__":
    main()
