"""`fourm-train-text-tokenizer`: train fourm's SentencePiece text tokenizer.

    fourm-train-text-tokenizer                                   # recipe tokenizers/text.py
    fourm-train-text-tokenizer --config tokenizers/text.py:smoke --config.out_dir=/tmp/text
    fourm-train-text-tokenizer --config.text_files=extra.txt     # + one text per line

Writes `<out_dir>/text.model` (SentencePiece protobuf) and `text.json` (layout, config, hash).
"""

from __future__ import annotations

import time

from absl import app

from fourm.cli import entry, positive
from fourm.config import REPO_ROOT, define_config_flag


def define_flags(fv, argv):
    define_config_flag(str(REPO_ROOT / "tokenizers" / "text.py"), fv, argv)


def run(args, F) -> int:
    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments: {args[1:]}")
    from fourm.tokenizers.corpus import corpus
    from fourm.tokenizers.text import TextTokenizer

    cfg = F.config
    positive("--config.vocab_size", int(cfg.vocab_size))
    positive("--config.scenes.count", int(cfg.scenes.count), allow_zero=True)
    texts = corpus(cfg)
    if not texts:
        raise app.UsageError("no training text: --config.scenes.count is 0 and --config.text_files "
                             "is empty")
    t0 = time.perf_counter()
    tok = TextTokenizer.train(texts, cfg.out_dir, cfg)
    print(f"trained {tok} on {len(texts)} texts in {time.perf_counter() - t0:.1f} s: "
          f"{tok.num_learned_pieces} learned pieces; wrote {cfg.out_dir}")
    print(f"example: {texts[0]!r} -> {tok.encode(texts[0])}")
    return 0


main = entry(__name__)

if __name__ == "__main__":
    main()
