"""`fourm-ml4m`: official 4M checkpoints -> fourm, and parity checks against 4M fixtures.

    fourm-ml4m convert SRC_DIR OUT_DIR     # 4M's config.json + model.safetensors -> fourm checkpoint
    fourm-ml4m check FIXTURE_DIR           # forward parity (and generation, when available)
        [--text_tokenizer text_tokenizer_4m_wordpiece_30k.json]   # also compare decoded text
    fourm-ml4m check-tokenizer DIR         # 4M tokenizer parity (tokens, quant, decoded; text
                                           # tokenizers: ids, tokens and both decodes)

`check` prints one table row per compared array (max |diff| for floats, mismatch counts for
integers) and exits 0 only if everything matches (floats within --tol absolute, integers exactly,
argmax wherever 4M's top-2 margin exceeds our logit error). Run-time options of the loaded model
come from --config (default: configs/model.py), e.g. --config.model.head_impl=dense.
`convert` refuses weights with NaN/Inf and an existing non-empty OUT_DIR (unless --overwrite).
Exit status: 0 done / parity holds, 1 parity fails, 2 bad input.
"""

from __future__ import annotations

import sys

from absl import flags

from fourm.cli import entry
from fourm.config import define_config_flag

USAGE = ("usage: fourm-ml4m convert SRC_DIR OUT_DIR | fourm-ml4m check FIXTURE_DIR | "
         "fourm-ml4m check-tokenizer FIXTURE_DIR")
RUNTIME_KEYS = ("dtype", "remat", "scan_layers", "attention_impl", "head_impl", "head_chunk")


def convert_or_check(args: list[str], runtime: dict | None = None, tol: float = 1e-4,
                     overwrite: bool = False, text_tokenizer: str | None = None) -> int:
    """The command's work for parsed arguments (tests call this). Returns the exit status."""
    from fourm.compat import ml4m, ml4m_check

    runtime = dict(runtime or {})
    if len(args) == 3 and args[0] == "convert":
        out = ml4m.convert(args[1], args[2], overwrite=overwrite)
        print(f"wrote fourm checkpoint {out} (load with fourm.model.pretrained.load_pretrained)")
        return 0
    if len(args) == 2 and args[0] == "check":
        rows = ml4m_check.run_check(args[1], tol=tol, text_tokenizer=text_tokenizer or None, **runtime)
        return _report(ml4m_check, rows)
    if len(args) == 2 and args[0] == "check-tokenizer":
        from fourm.compat.ml4m_tokenizers import check as tok_check

        return _report(ml4m_check, tok_check.run_check(args[1], tol=tol))
    print(f"fourm-ml4m: error: {USAGE}; got {args}", file=sys.stderr)
    return 2


def _report(ml4m_check, rows) -> int:
    """The table, then one line starting PASS or FAIL; the exit status."""
    print(ml4m_check.format_table(rows))
    ok = ml4m_check.passed(rows)
    failed = [r.name for r in rows if r.ok is False]
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r.ok is True for r in rows)} matched, "
          f"{len(failed)} failed, {sum(r.ok is None for r in rows)} skipped"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 0 if ok else 1


def define_flags(fv, argv):
    define_config_flag("model", fv, argv)
    flags.DEFINE_float("tol", 1e-4, "check: absolute tolerance for float arrays", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "convert: replace the checkpoint in an existing OUT_DIR",
                      flag_values=fv)
    flags.DEFINE_string("text_tokenizer", None, "check: 4M's WordPiece tokenizer JSON; generated text is "
                        "then decoded and compared too (default: a text_tokenizer*.json in the fixture)",
                        flag_values=fv)


def run(argv, F) -> int:
    cfg = F.config
    runtime = {k: cfg.model[k] for k in RUNTIME_KEYS if "model" in cfg and k in cfg.model}
    if not F.tol >= 0:
        raise ValueError(f"--tol={F.tol}: expected a non-negative number")
    return convert_or_check(list(argv[1:]), runtime, F.tol, F.overwrite, F.text_tokenizer)


main = entry(__name__)

if __name__ == "__main__":
    main()
