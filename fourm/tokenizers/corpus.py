"""The text corpus fourm's SentencePiece tokenizer trains on: scene captions (+ box class names)
and the lines of the config's text files."""

from __future__ import annotations

from pathlib import Path


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
