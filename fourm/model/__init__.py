"""fourm's 4M encoder-decoder (Flax NNX): model, loss, sharding rules, sizes, pretrained I/O.

    cfg = fourm.config.load_config("model:base").model        # or any config's `model` section
    model = build_model(cfg, modalities=None, seed=0)          # FourM; modalities default: cfg.modalities
    loss, metrics = loss_fn(model, batch)                       # batch: fourm.batch layout
    enc = model.encode(batch); enc.features                     # encoder-only use (B, N_enc, D)
    y = model.decode(enc, batch); model.logits(y, "caption")    # decoder output, full logits

Samplers: `fourm.model.decoding` (predict_grid, ar_prefill, ar_step). Checkpoints:
save_pretrained(model, cfg, dir) / load_pretrained(dir). Sharding: `fourm.model.sharding`.
Host-side batch checks: validate_batch(model.spec, batch).
"""

from fourm.model.fourm_model import BatchError, Encoded, FourM, build_model, check_batch_shapes
from fourm.model.loss import loss_fn, reduce_loss
from fourm.model.pretrained import CheckpointError, load_pretrained, save_pretrained
from fourm.model.sizes import SIZES, VARIANTS, mlp_hidden_dim, model_config
from fourm.model.spec import ModelSpec
from fourm.model.validate import validate_batch

__all__ = ["BatchError", "CheckpointError", "Encoded", "FourM", "ModelSpec", "SIZES", "VARIANTS",
           "build_model", "check_batch_shapes", "load_pretrained", "loss_fn", "mlp_hidden_dim",
           "model_config", "reduce_loss", "save_pretrained", "validate_batch"]
