"""Sharded pretraining: mesh, grain input pipeline, jitted update step, orbax checkpoints.

    from fourm.train import train
    train(fourm.config.load_config("pretrain:smoke", ["data.dir=DATA"]), workdir="runs/smoke")

Modules: `trainer` (the story, read it first), `step` (pure update/eval steps), `mesh`,
`input_pipeline` (grain), `optimizer` (AdamW as 4M), `checkpointing` (orbax), `metrics`
(TensorBoard + JSON lines, progress bar), `distributed` (multi-host start-up), `aot`
(compile for a TPU slice on CPU).
"""


def train(config, workdir=None):
    """`fourm.train.trainer.train` (imported lazily: importing the package stays cheap)."""
    from fourm.train.trainer import train as _train
    return _train(config, workdir)


__all__ = ["train"]
