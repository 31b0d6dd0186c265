"""`fourm-train-tokenizer`: train an image-like tokenizer (VQ-VAE) from a recipe.

    fourm-train-tokenizer --config tokenizers/rgb.py:64
    fourm-train-tokenizer --config tokenizers/depth.py:64,fsq --config.train.steps=2000
    fourm-train-tokenizer --config tokenizers/semseg.py:224 --workdir runs/tok_semseg224

Rerunning the same command resumes from the run's latest checkpoint. Writes to the workdir:
checkpoints/ (orbax), metrics.jsonl, tb/ (TensorBoard), images/step_*.png (input |
reconstruction) and eval_step*.json (held-out metrics at the end).
"""

from __future__ import annotations

from absl import app, flags

from fourm.cli import entry, positive
from fourm.config import REPO_ROOT, define_config_flag


def define_flags(fv, argv):
    define_config_flag(str(REPO_ROOT / "tokenizers" / "rgb.py"), fv, argv)
    flags.DEFINE_string("workdir", None, "run directory (default: the config's workdir)", flag_values=fv)
    flags.DEFINE_integer("steps", None, "train steps (default: config train.steps)", flag_values=fv)


def run(args, F) -> int:
    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments {args[1:]}")
    from fourm.tokenizers.evaluate import format_report
    from fourm.tokenizers.train import train

    positive("--steps", F.steps)
    positive("--config.train.steps", int(F.config.train.steps))
    positive("--config.train.batch_size", int(F.config.train.batch_size))
    lr = float(F.config.train.lr)
    if not lr > 0 or lr == float("inf"):
        raise app.UsageError(f"--config.train.lr={lr}: expected a positive finite number")
    result = train(F.config, workdir=F.workdir, steps=F.steps)
    if "eval" in result:
        print(format_report(result["eval"]))
    print(f"run directory: {result['workdir']}")
    return 0


main = entry(__name__)


if __name__ == "__main__":
    main()
