"""Text tokenizer recipe: `fourm-train-text-tokenizer --config tokenizers/text.py[:options]`.

A SentencePiece BPE model with 4M's reserved ids (PAD/UNK/SOS/EOS, span sentinels, value-bin
tokens v0..v3) trained on scene captions (and the class names of their boxes) plus any text files
given (`--config.text_files=a.txt,b.txt`, one text per line). Options: `smoke` (few scenes).
"""

import ml_collections

from fourm.config import common_config


def get_config(arg=None):
  opts = {o.strip() for o in (arg or "").split(",") if o.strip()}
  if opts - {"smoke"}:
    raise ValueError(f"tokenizers/text.py: unknown options {sorted(opts - {'smoke'})}; use smoke")
  c = common_config()
  # ---- tokenizer fields (what the model file depends on) ----
  c.vocab_size = 4096  # = fourm.modalities.TEXT_VOCAB; small corpora are padded with unused ids
  c.num_sentinels = 100  # [S_0]..[S_99]: enough for span masking of 64-token captions
  c.value_bins = 100  # v0=0..v0=99 etc.; 4M uses 1000 at 224 px, 100 is sub-pixel at 64 px
  c.model_type = "bpe"  # unigram keeps only ~100 pieces on the scene captions (2.3 tokens/word)
  c.max_piece_length = 16
  # ---- corpus ----
  c.scenes = ml_collections.ConfigDict(dict(
      seed=c.seed, start=0, count=200 if "smoke" in opts else 10000, resolution=c.resolution))
  c.include_box_classes = True  # box class names (the words `det` text adds to captions)
  c.text_files = []  # extra UTF-8 files, one text per line
  c.out_dir = "runs/tokenizers/text"
  c.workers = c.num_workers
  return c
