"""`fourm-export-tokenizer CKPT OUT_DIR`: a self-contained tokenizer directory (jax + numpy only).

    fourm-export-tokenizer runs/tokenizers/tok_rgb@64 exports/tok_rgb@64
    fourm-export-tokenizer runs/tokenizers/tok_rgb@64/checkpoints/2000 exports/tok_rgb@64_2000

CKPT is a training run (latest checkpoint, or `--step`) or one of its checkpoints/<step>
folders. OUT_DIR gets config.json, weights.npz, encode.jaxexport, decode.jaxexport and a README;
it appears atomically, and an existing OUT_DIR is only replaced with `--overwrite`.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing OUT_DIR")
_PLATFORMS = flags.DEFINE_list("platforms", None, "platforms the serialized functions are "
                               "lowered for (default cpu,cuda,tpu; cpu alone if those fail)")


def _main(argv):
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) != 3:
        raise app.UsageError("usage: fourm-export-tokenizer CKPT OUT_DIR [--step N] [--overwrite]")
    from fourm.tokenizers.export import export, load_export
    from fourm.tokenizers.runs import from_run

    ckpt, out = Path(argv[1]), Path(argv[2])
    if out.exists() and not _OVERWRITE.value:  # fail before any work
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    step = _STEP.value
    if ckpt.parent.name == "checkpoints" and ckpt.name.isdigit():
        if step is not None and step != int(ckpt.name):
            raise app.UsageError(f"--step {step} contradicts checkpoint folder {ckpt}")
        ckpt, step = ckpt.parent.parent, int(ckpt.name)
    tok = from_run(ckpt, step=step)
    path = export(tok, out, platforms=_PLATFORMS.value, overwrite=_OVERWRITE.value)
    back = load_export(path)  # proves the artifact loads and matches
    print(f"exported {back.name} step {back.step} ({back.version}) to {path}")


def main():
    from fourm.cli import run_with_clean_errors

    run_with_clean_errors(_main)


if __name__ == "__main__":
    main()
