"""`fourm-pretokenize`: turn a dataset into ArrayRecord shards of tokens (+ manifest.json).

    fourm-pretokenize                                        # configs/pretokenize.py (scenes)
    fourm-pretokenize --config configs/pretokenize.py:text,smoke   # no image tokenizers needed
    fourm-pretokenize --config.source.kind=folder --config.source.folder=DIR --config.source.count=-1
    fourm-pretokenize --config.augment.enabled=true --config.augment.hflip=0.5   # crops + flips

Rerunning the same command resumes: finished shards are kept, the rest are redone. Prints the
throughput (samples per second) at the end; it is also stored in the manifest.
"""

from __future__ import annotations

from absl import app

from fourm.config import define_config_flag

_CONFIG = define_config_flag("pretokenize")


def load_image_tokenizer(path: str):
    """An image tokenizer from a training workdir (has checkpoints/) or an exported folder."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image tokenizer {p} does not exist (train it with the tokenizer "
                                f"recipes, or point --config.image_tokenizers.<modality> at an "
                                f"exported tokenizer)")
    if (p / "checkpoints").is_dir():
        from fourm.tokenizers.image import ImageTokenizer

        return ImageTokenizer.from_checkpoint(p)
    import fourm.tokenizers as tokenizers_pkg

    if not hasattr(tokenizers_pkg, "load"):
        raise FileNotFoundError(f"image tokenizer {p} has no checkpoints/ folder (not a training "
                                f"workdir) and this install has no exported-tokenizer loader")
    return tokenizers_pkg.load(p)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm import modalities as registry
    from fourm.data.augment import Augment
    from fourm.tokenizers.pretokenize import pretokenize
    from fourm.tokenizers.sources import make_source
    from fourm.tokenizers.text import TextTokenizer

    cfg = _CONFIG.value
    source = make_source(cfg.source)
    image_toks = {m: load_image_tokenizer(p) for m, p in cfg.image_tokenizers.items()}
    needs_text = any(registry.get(m).kind == "sequence" for m in cfg.modalities)
    text_tok = TextTokenizer.load(cfg.text_tokenizer) if needs_text else None
    manifest = pretokenize(
        source, cfg.out_dir, modalities=list(cfg.modalities), image_tokenizers=image_toks,
        text_tokenizer=text_tok, tokenizer_paths=dict(cfg.image_tokenizers, text=cfg.text_tokenizer),
        shard_size=int(cfg.shard_size), batch_size=int(cfg.batch_size),
        workers=int(cfg.workers), source_info=source.info(), default_size=int(cfg.source.resolution),
        strict_metadata=bool(cfg.strict_metadata), overwrite=bool(cfg.overwrite),
        augment=Augment.from_config(cfg.get("augment")))
    b = manifest["benchmark"]
    print(f"wrote {manifest['num_records']} samples in {len(manifest['shards'])} shards to "
          f"{cfg.out_dir}")
    for name, spec in manifest["modalities"].items():
        if "lengths" in spec:
            ln = spec["lengths"]
            print(f"  {name}: length mean {ln['mean']:.1f}, max {ln['max']} (registry max "
                  f"{spec['max_length']}; {ln['over_max_length']} samples longer)")
    print(f"benchmark: {b['samples']} samples in {b['seconds']:.2f} s = "
          f"{b['samples_per_second']:.1f} samples/s (workers={b['workers']}, "
          f"batch={b['batch_size']})")


def main():
    app.run(_main)


if __name__ == "__main__":
    main()
