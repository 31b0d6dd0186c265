"""fourm pretraining, as one story: config -> mesh -> grain pipeline -> sharded, jitted update step
-> orbax checkpoints -> evals -> the loop. Read `train()` top to bottom; helpers sit above it.

Guarantees (each one tested):
* Bad configs fail before any compute, with the field and the expected value named.
* Exact resume: a run killed (even with SIGKILL) and restarted gives bitwise the same losses,
  parameters and optimizer state as an uninterrupted one: the state is saved whole, the data order
  and masks are a pure function of (seed, global example index), grain's iterator position is
  checkpointed, and the resumed process runs the same compiled program (its fingerprint is saved
  with every checkpoint and compared on resume).
* SIGTERM (preemption) saves at the next step boundary and returns normally (exit status 0),
  also when it arrives during start-up (then at the first step boundary, before any step).
* Integrity: shards are checked against their manifest's sha256 before the first step; a
  checkpoint whose arrays fail their checksums or hold NaN/Inf is set aside and the previous one
  used (fourm.train.checkpointing); a model with non-finite parameters is never exported.
* Metrics: each step appears once in metrics.jsonl and TensorBoard across any number of resumes
  (rows after the restored step are dropped), and a checkpoint step's rows are written before
  its checkpoint, so a resume never lacks them.
* A multi-process run computes on the same global batches as a one-process run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from fourm import config as config_lib
from fourm.data.shards import decode_record, open_shards
from fourm.io import atomic_write_json
from fourm.masking import GrainMasking
from fourm.model import loss_fn as fourm_loss_fn
from fourm.model.pretrained import save_pretrained
from fourm.runtime import CompileTimer
from fourm.train import checkpointing, finetune, input_pipeline, metrics as metrics_lib
from fourm.train.checkpointing import CheckpointMismatchError  # noqa: F401 (re-exported)
from fourm.train.mesh import describe as describe_mesh
from fourm.train.plan import build_plan, check_batch, check_manifest  # noqa: F401 (re-exported)
from fourm.train.plan import compile_step as compile_train_step, program_fingerprint  # noqa: F401 (seam)
from fourm.train.validate import ConfigError, check_config  # noqa: F401 (ConfigError re-exported)

log = logging.getLogger("fourm.train")


class NonFiniteError(FloatingPointError):
    """NaN/Inf in the loss or gradients (names the step and the modalities involved)."""


@dataclasses.dataclass
class TrainResult:
    step: int  # last completed step
    preempted: bool
    last_metrics: dict
    workdir: str


class SelectModalities:
    """Record bytes -> {modality: array} for the configured modalities only (picklable)."""

    def __init__(self, names):
        self.names = list(names)

    def __call__(self, data):
        rec = decode_record(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        return {n: rec[n] for n in self.names}


def model_loss_fn():
    """The loss the plan's steps use (a seam for tests that poison it)."""
    return fourm_loss_fn


def nonfinite_report(step: int, m: dict) -> str:
    """Name the culprit: modalities whose own loss is non-finite; failing that, the modalities
    whose parameters got non-finite gradients (a NaN loss poisons every gradient, so the loss
    is the sharper witness)."""
    bad_loss = sorted(k.split("/", 1)[1] for k, v in m.items()
                      if k.startswith("loss/") and not np.isfinite(v))
    bad_grad = sorted(k.split("/", 1)[1] for k, v in m.items() if k.startswith("nonfinite/") and v > 0)
    mods = bad_loss or [g for g in bad_grad if g != "shared"] or bad_grad or ["(unknown)"]
    return (f"non-finite loss or gradients at step {step}: modalities {mods} (loss {m.get('loss')}; "
            f"non-finite modality losses: {bad_loss or 'none'}; non-finite gradients in: "
            f"{bad_grad or 'none'})")


def export_model(graphdef, state, config, directory: Path) -> None:
    """The trained model as a fourm checkpoint (config.json + model.safetensors) for generation:
    `fourm.model.load_pretrained(directory)`. Process 0 writes; parameters are gathered first."""
    params, rest = state["params"], state["rest"]
    _, bad = checkpointing.array_checksums(params)
    if bad:  # never hand out a broken model as a finished one
        raise NonFiniteError(f"not exporting to {directory}: parameters hold NaN/Inf values: "
                             f"{dict(list(bad.items())[:4])}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    else:
        params, rest = jax.device_get((params, rest))
    if jax.process_index() == 0:
        save_pretrained(nnx.merge(graphdef, params, rest), config, directory)
        log.info("exported the model to %s", directory)


class PreemptionWatch:
    """SIGTERM -> stop at the next step boundary. Multi-process runs agree on the step through
    JAX's preemption sync point (its coordination service catches the signal on every host)."""

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service disabled
                return False
        return self.requested

    def close(self):
        if not self._multi:
            signal.signal(signal.SIGTERM, self._old)


# ------------------------------------------------------------------------------------------------
# The story.
# ------------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> TrainResult:
    # First of all: a SIGTERM during start-up (reading data, compiling) then stops the run cleanly
    # at its first step boundary instead of killing it (exit 143).
    preempt = PreemptionWatch()
    try:
        return _train(config, workdir, preempt)
    finally:
        preempt.close()


def _train(config: ml_collections.ConfigDict, workdir: str | None, preempt: PreemptionWatch) -> TrainResult:
    started = time.perf_counter()
    check_config(config, jax.device_count())  # before anything is read or written
    workdir = Path(workdir or config.workdir).absolute()

    # ---------------------------------------------------------------- data manifest
    try:  # a damaged, incomplete or escaping shard folder stops here, before any compute
        source, manifest = open_shards(config.data.dir, verify=config.data.get("verify_shards", True))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.data.dir={config.data.dir}: {e}") from None

    # ---------------------------------------------------------------- plan
    # Mesh, modalities, masking, shardings, optimizer, abstract state and the jitted steps, as
    # fourm-aot and the benchmark build them (fourm.train.plan). A fine-tune run that resumes
    # takes what its init checkpoint provided from its own record, never from the checkpoint.
    plan = build_plan(config, manifest, data_dir=config.data.dir, loss_fn=model_loss_fn(),
                      init=finetune.read_record(workdir))
    config = plan.resolved_config()
    mesh = plan.mesh

    # ---------------------------------------------------------------- logging (nothing written before)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    writer = metrics_lib.MetricWriter(workdir)
    log.info("workdir %s, process %d of %d", workdir, jax.process_index(), jax.process_count())

    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                      async_save=config.async_checkpoint,
                                      durable_within_steps=config.get("ckpt_durable_within_steps", 1))
    log.info("mesh %s", describe_mesh(mesh))
    log.info("model: %.2fM parameters, %d modalities", plan.num_params / 1e6, len(plan.modalities))

    # ---------------------------------------------------------------- input
    # Each process loads exactly the rows of every global batch that its devices hold.
    batch_sh = plan.batch_shardings
    row_offset, _ = input_pipeline.process_rows(batch_sh["enc_ids"], config.batch_size)

    def make_dataset(src, seed, start_step=0):
        return input_pipeline.build_dataset(
            src, transform=GrainMasking(plan.masking), decode=SelectModalities(config.model.modalities),
            seed=seed, global_batch=config.batch_size, row_offset=row_offset, start_step=start_step)

    def make_iterator(start_step=0):
        return input_pipeline.to_iterator(
            make_dataset(source, config.seed, start_step), num_workers=config.data.num_workers,
            num_threads=config.data.num_threads, prefetch=config.data.prefetch)

    def to_device(local_batch):
        return input_pipeline.global_batch_array(local_batch, batch_sh, row_offset)

    data_iter = make_iterator()

    # ---------------------------------------------------------------- checkpoint
    config_json = json.loads(config_lib.to_json(config))
    restored = ckpt.restore_latest(plan.abstract_state, data_iter)  # a misfit raises before compiling
    writer.resume_at(0 if restored is None else restored.step)  # later rows are redone: drop them
    # Compiled ahead of time once the checkpoint is known to fit the model.
    with CompileTimer() as compiled:  # with the persistent cache warm: tracing + a cache read
        train_step, fingerprint = compile_train_step(plan.train_step, plan.abstract_state,
                                                     plan.abstract_batch, mesh)
    log.info("train step compiled in %.1f s", compiled.seconds)
    eval_step = plan.eval_step
    ckpt_meta = {"train_step_fingerprint": fingerprint}
    if restored is not None:
        state, start = restored.state, restored.step
        if not restored.data_restored:
            data_iter = make_iterator(start_step=start)
        log.info("resumed from step %d (%s)", start, ckpt.directory / str(start))
        saved = (restored.meta or {}).get("train_step_fingerprint")
        if saved is not None and saved != fingerprint:
            log.warning("resuming with a different train-step program than the one that wrote step "
                        "%d (fingerprint %s..., now %s...: code, jax/jaxlib or XLA_FLAGS changed); "
                        "the run goes on, but not bitwise like an uninterrupted one",
                        start, saved[:12], fingerprint[:12])
    else:
        state = plan.init_state()
        start = 0
        if plan.init is not None:
            log.info("%s", plan.init.summary())
        if is_main:
            if plan.init is not None:
                finetune.write_record(workdir, plan.init)
            atomic_write_json(workdir / "config.json", config_json)

    # ---------------------------------------------------------------- evals
    eval_batches = []
    if config.eval_every > 0 and config.eval_batches > 0:
        eval_src = (open_shards(config.data.eval_dir, verify=config.data.get("verify_shards", True))[0]
                    if config.data.eval_dir else source)
        eval_ds = make_dataset(eval_src, config.seed + 1)
        eval_batches = [eval_ds[i] for i in range(config.eval_batches)]

    def run_eval(state) -> dict:
        with jax.set_mesh(mesh):
            outs = [eval_step(state, to_device(b)) for b in eval_batches]
        outs = jax.device_get(outs)
        return {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}

    # ---------------------------------------------------------------- loop
    total = int(config.num_train_steps)
    progress = metrics_lib.Progress(start, total, config.batch_size * plan.tokens_per_example)
    pending: tuple[int, Any] | None = None
    # Resumed at the end (killed after the final checkpoint): the final rows were written before it.
    last: dict = metrics_lib.last_row(workdir / "metrics.jsonl", start) if start == total else {}
    skipped = 0

    def finish_step(step: int, dev_metrics) -> dict:
        """Host side of a step, run one step late so the device is never idle waiting for it."""
        nonlocal skipped
        m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
        if step == start + 1:
            log.info("first step done %.1f s after start (train step compile %.1f s)",
                     time.perf_counter() - started, compiled.seconds)
        if m["finite"] < 1:
            if config.nonfinite != "skip":
                raise NonFiniteError(nonfinite_report(step, m))
            skipped += 1
            log.warning("skipped update: %s", nonfinite_report(step, m))
        progress.update(step, m["loss"])
        if step % config.log_every == 0 or step == total:
            writer.write(step, {**m, "skipped_steps": skipped})
        return m

    step = last_saved = start
    preempted = False
    try:
        while step < total:
            if preempt.reached(step):
                log.warning("SIGTERM: saving step %d and exiting", step)
                if pending is not None:  # its rows before its checkpoint, as at every save
                    last, pending = finish_step(*pending), None
                writer.flush()
                if step != last_saved:
                    ckpt.save(step, state, data_iter, config_json, meta=ckpt_meta, force=True)
                preempted = True
                break
            batch = to_device(next(data_iter))
            with jax.set_mesh(mesh):
                state, dev_metrics = train_step(state, batch)
            step += 1
            ckpt.step_boundary(step)  # the previous checkpoint becomes durable here at the latest
            if pending is not None:
                last = finish_step(*pending)
            pending = (step, dev_metrics)
            save_now = step % config.ckpt_every == 0 or step == total
            if save_now:  # this step's rows land before its checkpoint: a resume never lacks them
                last, pending = finish_step(*pending), None
            if eval_batches and (step % config.eval_every == 0 or step == total):
                writer.write(step, run_eval(state), split="eval")
            if save_now:
                writer.flush()
                # Returns once the arrays are on host; the files are written in the background.
                ckpt.save(step, state, data_iter, config_json, meta=ckpt_meta)
                last_saved = step
        if pending is not None:
            last = finish_step(*pending)
        if step == total and not preempted:
            export_model(plan.graphdef, state, config, workdir / "export")
    finally:
        ckpt.wait()
        ckpt.close()
        if hasattr(data_iter, "close"):  # stops grain's worker processes, frees shared memory
            data_iter.close()
        progress.close()
        writer.close()
    return TrainResult(step=step, preempted=preempted, last_metrics=last, workdir=str(workdir))
