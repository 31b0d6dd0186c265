"""`fourm-pretokenize`: turn a dataset into ArrayRecord shards of tokens (+ manifest.json).

    fourm-pretokenize                                        # configs/pretokenize.py (scenes)
    fourm-pretokenize --config configs/pretokenize.py:text,smoke   # no image tokenizers needed
    fourm-pretokenize --config.source.kind=folder --config.source.folder=DIR --config.source.count=-1
    fourm-pretokenize --config.image_tokenizers.tok_depth@64=exports/tok_depth@64
    fourm-pretokenize --config.augment.enabled=true --config.augment.hflip=0.5   # crops + flips

Rerunning the same command resumes: finished shards are kept, the rest are redone. Prints the
throughput (samples per second) at the end; it is also stored in the manifest. Each image
tokenizer must be the one of its modality (its name is checked), and every tokenizer is loaded
before any shard is written.
"""

from __future__ import annotations

from absl import app

from fourm.cli import entry, positive
from fourm.config import define_config_flag


def define_flags(fv, argv):
    define_config_flag("pretokenize", fv, argv)


def run(args, F) -> int:
    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments: {args[1:]}")
    import fourm.tokenizers as toks
    from fourm import modalities as registry
    from fourm.data.augment import Augment
    from fourm.tokenizers.pretokenize import pretokenize
    from fourm.tokenizers.sources import make_source
    from fourm.tokenizers.text import TextTokenizer

    cfg = F.config
    for key in ("shard_size", "batch_size"):
        positive(f"--config.{key}", int(cfg[key]))
    positive("--config.workers", int(cfg.workers), allow_zero=True)
    source = make_source(cfg.source)
    image_toks = {m: toks.load(p, modality=m, what=f"--config.image_tokenizers.{m}")
                  for m, p in cfg.image_tokenizers.items()}
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
          f"batch={b['batch_size']}), {b['cores_busy']:.1f} of {b['cores']} cores busy")
    return 0


main = entry(__name__)

if __name__ == "__main__":
    main()
