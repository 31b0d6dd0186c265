"""`fourm-export-tokenizer CKPT OUT_DIR`: a self-contained tokenizer directory (no fourm needed).

    fourm-export-tokenizer runs/tokenizers/tok_rgb@64 exports/tok_rgb@64
    fourm-export-tokenizer runs/tokenizers/tok_rgb@64/checkpoints/2000 exports/tok_rgb@64_2000

CKPT is a training run (latest checkpoint, or `--step`) or one of its checkpoints/<step>
folders, or a 4M tokenizer folder (config.json + model.safetensors, e.g. a released
EPFL-VILAB/4M_tokenizers_* VQVAE); ViT sizes 4M does not define are given with --ml4m_vit:

    fourm-export-tokenizer 4M_tokenizers_semseg_4k_224 exports/semseg_4m
    fourm-export-tokenizer tiny_tok exports/tiny --ml4m_vit vit_t_enc:64:2:2,vit_t_dec:64:2:2

OUT_DIR gets config.json, weights.npz, encode.jaxexport, decode.jaxexport and a README;
it appears atomically, and an existing OUT_DIR is only replaced with `--overwrite`. Using the
export needs `jax` and `numpy`, plus `flatbuffers`, which `jax.export.deserialize` imports.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from fourm.cli import entry, positive


def define_flags(fv, argv):
    del argv
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace an existing OUT_DIR", flag_values=fv)
    flags.DEFINE_list("ml4m_vit", [], "4M tokenizers: extra ViT sizes NAME:DIM:DEPTH:HEADS "
                      "(e.g. vit_t_enc:64:2:2) for names that are not 4M presets", flag_values=fv)
    flags.DEFINE_list("platforms", None, "platforms the serialized functions are lowered for "
                      "(default cpu,cuda,tpu; cpu alone if those fail)", flag_values=fv)


def run(argv, F) -> int:
    if len(argv) != 3:
        raise app.UsageError("usage: fourm-export-tokenizer CKPT OUT_DIR [--step N] [--overwrite]")
    from fourm.tokenizers.export import export, load_export
    from fourm.tokenizers.image import ImageTokenizer

    ckpt, out = Path(argv[1]), Path(argv[2])
    positive("--step", F.step, allow_zero=True)
    if not ckpt.is_dir():
        raise app.UsageError(f"CKPT {ckpt}: no such folder (expected a tokenizer training run or a "
                             "4M tokenizer folder)")
    if out.exists() and not F.overwrite:  # fail before any work
        raise FileExistsError(f"OUT_DIR {out} exists; pass --overwrite to replace it")
    if (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file():
        return _export_ml4m(ckpt, out, F)
    step = F.step
    if ckpt.parent.name == "checkpoints" and ckpt.name.isdigit():
        if step is not None and step != int(ckpt.name):
            raise app.UsageError(f"--step {step} contradicts checkpoint folder {ckpt}")
        ckpt, step = ckpt.parent.parent, int(ckpt.name)
    tok = ImageTokenizer.from_checkpoint(ckpt, step=step)
    path = export(tok, out, platforms=F.platforms, overwrite=F.overwrite)
    back = load_export(path)  # proves the artifact loads and matches
    print(f"exported {back.name} step {back.step} ({back.version}) to {path}")
    return 0


def _export_ml4m(src: Path, out: Path, F) -> int:
    from fourm.compat.ml4m_tokenizers.config import ViTArch, register_vit
    from fourm.compat.ml4m_tokenizers.load import load as load_ml4m
    from fourm.tokenizers.export import export, load_export

    for item in F.ml4m_vit:
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise app.UsageError(f"--ml4m_vit {item!r}: expected NAME:DIM:DEPTH:HEADS, e.g. vit_t_enc:64:2:2")
        register_vit(parts[0], ViTArch(*(int(p) for p in parts[1:])))
    if F.step is not None:
        raise app.UsageError(f"--step does not apply to a 4M tokenizer folder ({src})")
    tok = load_ml4m(src)
    path = export(tok, out, platforms=F.platforms, overwrite=F.overwrite)
    back = load_export(path)  # proves the artifact loads and matches
    print(f"exported 4M {back.cfg.cls} {back.name} ({back.version}) to {path}")
    return 0


main = entry(__name__)


if __name__ == "__main__":
    main()
