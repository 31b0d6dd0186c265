"""`fourm-train-text-tokenizer`: train fourm's SentencePiece text tokenizer.

    fourm-train-text-tokenizer                                   # recipe tokenizers/text.py
    fourm-train-text-tokenizer --config tokenizers/text.py:smoke --config.out_dir=/tmp/text
    fourm-train-text-tokenizer --config.text_files=extra.txt     # + one text per line

Writes `<out_dir>/text.model` (SentencePiece protobuf) and `text.json` (layout, config, hash).
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app

from fourm.config import REPO_ROOT, define_config_flag

_CONFIG = define_config_flag(str(REPO_ROOT / "tokenizers" / "text.py"))


def corpus(cfg) -> list[str]:
    """Scene captions (+ box class names) and the lines of cfg.text_files."""
    from fourm.data import scenes

    texts = []
    sc = cfg.scenes
    if sc.count > 0:
        for s in scenes.generate_scenes(sc.seed, sc.start, sc.count, resolution=sc.resolution,
                                        workers=int(cfg.workers)):
            texts.append(s["caption"])
            if cfg.include_box_classes and s["boxes"]:
                texts.append(" ".join(b["class"] for b in s["boxes"]))
    for path in cfg.text_files:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config.text_files: {p} does not exist")
        try:
            texts += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--config.text_files: {p} is not UTF-8 text ({e})") from None
    return texts


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm.tokenizers.text import TextTokenizer

    cfg = _CONFIG.value
    texts = corpus(cfg)
    t0 = time.perf_counter()
    tok = TextTokenizer.train(texts, cfg.out_dir, cfg)
    print(f"trained {tok} on {len(texts)} texts in {time.perf_counter() - t0:.1f} s: "
          f"{tok.num_learned_pieces} learned pieces; wrote {cfg.out_dir}")
    sample = texts[0] if texts else "a red cube"
    print(f"example: {sample!r} -> {tok.encode(sample)}")


def main():
    app.run(_main)


if __name__ == "__main__":
    main()
