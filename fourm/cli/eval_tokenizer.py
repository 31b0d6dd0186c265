"""`fourm-eval-tokenizer`: reconstruction quality and codebook usage on held-out scenes.

    fourm-eval-tokenizer runs/tokenizers/tok_rgb@64            # a training run (latest checkpoint)
    fourm-eval-tokenizer runs/tokenizers/tok_rgb@64 --step 1000
    fourm-eval-tokenizer exports/tok_depth@64 --num 1024       # an exported artifact

Prints the modality's metrics (RGB PSNR; depth AbsRel and RMSE; normals angular error;
segmentation pixel accuracy and mIoU) and codebook usage / perplexity, marks the quickstart
targets, and writes the figures as JSON (`--out`, default RUN/eval_stepN.json for runs).
Held-out data: the run's `data` section (scenes from a disjoint index range; an explicit
`--config` file's `data` section replaces it); for an export, the recipes' defaults. The flags
`--data_seed/--eval_start/--num/--cache_dir` override either.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from fourm.cli import entry, positive
from fourm.config import REPO_ROOT, define_config_flag


def define_flags(fv, argv):
    define_config_flag(str(REPO_ROOT / "tokenizers" / "rgb.py"), fv, argv,
                       "optional: a tokenizer config; it must agree with the checkpoint")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
    flags.DEFINE_integer("num", None, "number of held-out images (default: data.eval_num)", flag_values=fv)
    flags.DEFINE_integer("eval_start", None, "first held-out scene index", flag_values=fv)
    flags.DEFINE_integer("data_seed", None, "scene generator seed", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, "scene cache folder (default: data.cache_dir)", flag_values=fv)
    flags.DEFINE_string("out", None, "write the metrics JSON here", flag_values=fv)


def run(argv, F) -> int:
    if len(argv) != 2:
        raise app.UsageError("usage: fourm-eval-tokenizer RUN_OR_EXPORT_DIR [flags]")
    positive("--num", F.num)
    positive("--step", F.step, allow_zero=True)
    positive("--eval_start", F.eval_start, allow_zero=True)
    from fourm.tokenizers import data as tok_data
    from fourm.tokenizers.evaluate import evaluate, format_report, write_report
    from fourm.tokenizers.export import load_export
    from fourm.tokenizers.image import ImageTokenizer, check_same_tokenizer
    from fourm.tokenizers.recipes import base_config, tokenizer_section
    from fourm.tokenizers.train import load_workdir_config

    path = Path(argv[1])
    if not path.is_dir():
        raise app.UsageError(f"{path}: no such folder (expected a tokenizer training run or export)")
    given = F.config if F["config"].present else None
    if (path / "checkpoints").is_dir():
        tok = ImageTokenizer.from_checkpoint(path, step=F.step, config=given)
        cfg = load_workdir_config(path)
        default_out = path / f"eval_step{tok.step:06d}.json"
    else:
        tok = load_export(path)
        if given is not None:
            check_same_tokenizer(tokenizer_section(tok.cfg), given, f"the export in {path}")
        # Data defaults of the recipes (held-out scene range), for the export's modality.
        cfg = base_config(tok.modality, tok.cfg.name, tok.cfg.codec.to_dict(),
                          str(tok.resolution))
        cfg.update({k: tok.cfg[k] for k in ("codec", "model", "quantizer", "grid")})
        default_out = None
    if given is not None:
        cfg.data = given.data
    if F.num is not None:
        cfg.data.eval_num = F.num
    if F.eval_start is not None:
        cfg.data.eval_start = F.eval_start
    if F.data_seed is not None:
        cfg.data.seed = F.data_seed
    if F.cache_dir is not None:
        cfg.data.cache_dir = F.cache_dir
    x = tok_data.load_split(cfg, "eval")
    metrics = evaluate(tok, x)
    metrics["data"] = {"source": cfg.data.source, "seed": int(cfg.data.seed),
                       "start": int(cfg.data.eval_start), "num": int(cfg.data.eval_num)}
    print(format_report(metrics))
    out = F.out or default_out
    if out:
        write_report(metrics, out)
        print(f"wrote {out}")
    return 0


main = entry(__name__)


if __name__ == "__main__":
    main()
