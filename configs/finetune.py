"""Fine-tune the quickstart's pretrained model on a new modality: boxes as text (`det`) from RGB.

    fourm-quickstart                               # once: runs/quickstart/{tokenizers,pretrain}
    fourm-pretokenize --config pretokenize:text --config.text_tokenizer=runs/quickstart/tokenizers/text \
        --config.source.count=4096 --config.out_dir=runs/finetune/det_train
    fourm-pretokenize --config pretokenize:text,eval --config.text_tokenizer=runs/quickstart/tokenizers/text \
        --config.source.count=64 --config.out_dir=runs/finetune/det_heldout
    fourm-train --config finetune

The quickstart model never saw `det`: its encoder/decoder blocks, RGB patch projection and caption
embeddings are loaded from `runs/quickstart/pretrain/export`; det's embeddings and output head start
fresh (the log names them) and learn at `init.new_lr`; the quickstart's tok_* parameters are not
used here (the log names them too). Variant `smoke` does the same from `fourm-quickstart --config
quickstart:smoke` (runs/quickstart_smoke) in a couple of minutes. Add e.g.
`--config.init.freeze=encoder/*` to keep the pretrained encoder blocks fixed.
"""

from fourm.config import load_config


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/finetune.py: variant {variant!r}; known: default, smoke")
  smoke = variant == "smoke"
  quickstart = "runs/quickstart_smoke" if smoke else "runs/quickstart"
  # The architecture must be the pretrained model's: start from the config that trained it.
  c = load_config(f"pretrain:{'smoke' if smoke else 'quickstart'}")
  c.variant = f"finetune_{variant}"
  c.workdir = f"runs/finetune/det{'_smoke' if smoke else ''}"

  c.init.checkpoint = f"{quickstart}/pretrain/export"
  c.init.freeze = ()
  pretrain_lr = c.optim.lr
  c.optim.lr = pretrain_lr / 2  # the loaded trunk is trained already: smaller steps
  c.init.new_lr = pretrain_lr  # det's fresh embeddings and head learn at the pretraining rate

  del c.model["modalities"]
  c.model.modalities = ("rgb@64", "caption", "det")
  c.data.dir = f"runs/finetune/det_train{'_smoke' if smoke else ''}"
  c.data.eval_dir = f"runs/finetune/det_heldout{'_smoke' if smoke else ''}"

  c.optim.warmup_steps = 10 if smoke else 30
  c.num_train_steps = 20 if smoke else 300
  c.eval_every = c.num_train_steps
  c.ckpt_every = 10 if smoke else 100
  c.log_every = 5 if smoke else 10
  return c
