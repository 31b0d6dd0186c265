"""`fourm-train-tokenizer`: train an image-like tokenizer (VQ-VAE) from a recipe.

    fourm-train-tokenizer --config tokenizers/rgb.py:64
    fourm-train-tokenizer --config tokenizers/depth.py:64,fsq --config.train.steps=2000
    fourm-train-tokenizer --config tokenizers/semseg.py:224 --workdir runs/tok_semseg224

Rerunning the same command resumes from the run's latest checkpoint. Writes to the workdir:
checkpoints/ (orbax), metrics.jsonl, tb/ (TensorBoard), images/step_*.png (input |
reconstruction) and eval_step*.json (held-out metrics at the end).
"""

from __future__ import annotations

from absl import app, flags, logging

from fourm.config import REPO_ROOT, define_config_flag

_CONFIG = define_config_flag(str(REPO_ROOT / "tokenizers" / "rgb.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: the config's workdir)")
_STEPS = flags.DEFINE_integer("steps", None, "train steps (default: config train.steps)")


def _main(argv):
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from fourm.tokenizers.evaluate import format_report
    from fourm.tokenizers.train import train

    result = train(_CONFIG.value, workdir=_WORKDIR.value, steps=_STEPS.value)
    if "eval" in result:
        print(format_report(result["eval"]))
    print(f"run directory: {result['workdir']}")


def main():
    from fourm.cli import run_with_clean_errors

    run_with_clean_errors(_main)


if __name__ == "__main__":
    main()
