"""The training plan: everything a train step is made of, built once from the config (+ manifest).

    plan = build_plan(config, manifest)        # modalities -> masking -> mesh, shardings ->
                                               # optimizer -> abstract state -> jitted steps
    compiled, fingerprint = plan.compile_train_step()
    state = plan.init_state()                  # fresh, or from config.init.checkpoint

The trainer, the AOT compiler (`fourm-aot`) and the training benchmark all build their step here,
so they compile the same program. The plan is frozen; the caller's config is never modified: the
vocabularies the data manifest decides are in `plan.config` (the plan's resolved copy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fourm import modalities as modreg
from fourm.masking import MaskingTransform
from fourm.model import build_model, loss_fn as model_loss_fn
from fourm.model.sharding import param_shardings
from fourm.train import finetune, input_pipeline, step as step_lib
from fourm.train.mesh import make_mesh
from fourm.train.optimizer import make_optimizer
from fourm.train.validate import ConfigError

log = logging.getLogger("fourm.train")


# ------------------------------------------------------------------------------------------------
# Checks that need the data manifest and the mesh, but no compute.
# ------------------------------------------------------------------------------------------------
def check_batch(config, mesh, process_count: int | None = None) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    pc = jax.process_count() if process_count is None else process_count
    b, a = int(config.batch_size), int(config.grad_accum)
    if a < 1 or b % a:
        raise ConfigError(f"config.batch_size={b} is not divisible by config.grad_accum={a}")
    if (b // a) % dp:
        raise ConfigError(
            f"config.batch_size={b} (per micro-batch {b // a}) is not divisible by the data-parallel "
            f"size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {dp}")
    if b % pc:
        raise ConfigError(f"config.batch_size={b} is not divisible by the {pc} processes")


def check_manifest(config, manifest: dict, data_dir: str) -> dict[str, int]:
    """Modalities present, tokenizer versions agree, vocabularies agree (or are taken from it).

    Returns the model's vocabulary overrides: `config.model.vocab_overrides` plus, with
    `config.data.vocab_from_manifest`, the manifest's sizes. The config is not modified."""
    have = manifest.get("modalities", {})
    wanted = list(config.model.modalities)
    missing = [m for m in wanted if m not in have]
    if missing:
        raise ConfigError(f"config.model.modalities names {missing}, which the data manifest "
                          f"{data_dir}/manifest.json does not have (it has {sorted(have)})")
    for name, expected in dict(config.data.tokenizers).items():
        if name not in have:
            raise ConfigError(f"config.data.tokenizers names {name!r}, absent from the manifest")
        tok = have[name].get("tokenizer", {})
        got = {str(tok.get("version", "")), str(tok.get("config_hash", ""))}
        if str(expected) not in got:
            raise ConfigError(
                f"tokenizer of {name!r}: config.data.tokenizers expects {expected!r}, but the shards "
                f"in {data_dir} were made with version {tok.get('version')!r} / config hash "
                f"{tok.get('config_hash')!r}; re-run pretokenize or fix the config")
    family = config.model.get("family", "fourm")
    vocab_overrides = dict(config.model.vocab_overrides)
    for name in wanted:
        vocab = have[name].get("vocab_size")
        if vocab is None:  # pixels
            continue
        current = vocab_overrides.get(name, modreg.get(name, family).vocab_size)
        if int(vocab) == int(current):
            continue
        if config.data.vocab_from_manifest:
            vocab_overrides[name] = int(vocab)
        else:
            raise ConfigError(f"vocabulary of {name!r}: the model has {current}, the shards' tokenizer "
                              f"{vocab}; set config.model.vocab_overrides.{name}={vocab} or "
                              f"config.data.vocab_from_manifest=True")
    return vocab_overrides


# ------------------------------------------------------------------------------------------------
# Shardings and compilation
# ------------------------------------------------------------------------------------------------
def _broadcast_prefix(prefix, full):
    """Expand a sharding tree that is a prefix of `full` (e.g. one sharding per nnx.Variable)."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, full,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def state_shardings(abstract_state, mesh, tx):
    """Shardings of the whole train state: params by the model's logical-axis rules, optimizer
    moments like their params, everything else replicated."""
    replicated = NamedSharding(mesh, P())
    params = _broadcast_prefix(param_shardings(abstract_state["params"], mesh), abstract_state["params"])
    rest = _broadcast_prefix(param_shardings(abstract_state["rest"], mesh), abstract_state["rest"])
    # Fine-tuning's multi_transform keeps a params-shaped tree per label, with MaskedNode where
    # another label owns the parameter: those stay as they are.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, abstract_state["opt"], params,
                                transform_non_params=lambda _: replicated, is_leaf=masked)
    return {"params": params, "rest": rest, "opt": opt, "step": replicated}


def with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def program_fingerprint(lowered) -> str:
    """sha256 of what decides the bits a train step computes: its StableHLO (which holds no source
    paths or line numbers), the jax/jaxlib versions, the device kind and XLA_FLAGS. Equal
    fingerprints + equal inputs = equal bits on CPU (tested); a resume under another fingerprint
    (code edited, library upgraded, flags changed) continues correctly but not bitwise."""
    import jaxlib
    h = hashlib.sha256(lowered.as_text().encode())
    dev = jax.devices()[0]
    for part in (jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind,
                 os.environ.get("XLA_FLAGS", "")):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()


def compile_step(step_fn, abstract_state, abstract_batch, mesh):
    """(compiled step, fingerprint), compiled ahead of time from the abstract state and batch.

    Why AOT: the program is fixed by the shapes/shardings the plan declares, never by the
    arrays it is first called with, so a resumed run (arrays from orbax) runs the very program
    a fresh run (arrays from init) does; an argument with another sharding or dtype is an error
    instead of a silent second compilation."""
    with jax.set_mesh(mesh):  # the model reads the mesh while tracing (sharding constraints)
        lowered = step_fn.lower(abstract_state, abstract_batch)
        return lowered.compile(), program_fingerprint(lowered)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainPlan:
    config: ml_collections.ConfigDict  # the plan's resolved copy (vocab from the manifest); read only
    mesh: Mesh
    modalities: tuple
    masking: MaskingTransform
    batch_spec: Mapping[str, tuple]  # key -> (per-example shape, dtype)
    batch_shardings: Mapping[str, Any]
    abstract_batch: Mapping[str, jax.ShapeDtypeStruct]  # global batch, with shardings
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    graphdef: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings
    state_shardings: Any
    train_step: Any  # jitted, state donated; compile with `compile_train_step`
    eval_step: Any
    init: finetune.InitPlan | None  # what config.init.checkpoint provides (None: fresh start)
    _fresh_state: Callable[[], Any] = dataclasses.field(repr=False, default=None)

    @property
    def tokens_per_example(self) -> int:
        return self.masking.input_budget + self.masking.target_budget

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state["params"]))

    def resolved_config(self) -> ml_collections.ConfigDict:
        """A mutable copy of the resolved config (for config.json and the export)."""
        return ml_collections.ConfigDict(self.config.to_dict())

    def compile_train_step(self):
        """(compiled train step, program fingerprint)."""
        return compile_step(self.train_step, self.abstract_state, self.abstract_batch, self.mesh)

    def init_state(self, tensors: Mapping[str, np.ndarray] | None = None):
        """The initial train state on the mesh: fresh parameters, with the init checkpoint's
        (`tensors`, default: read from config.init.checkpoint) in place of the matching ones."""
        state = jax.jit(self._fresh_state, out_shardings=self.state_shardings)()
        if self.init is None:
            return state
        if tensors is None:
            tensors = finetune.read_init_tensors(self.init.source)
        return finetune.load_into(state, tensors, self.init)


def _abstract_model(model_cfg, seed: int):
    # No mesh in context here: parameters carry logical axis names and are placed by the caller.
    return nnx.eval_shape(lambda: build_model(model_cfg, seed=seed))


def build_plan(config, manifest: dict | None = None, *, data_dir: str = "", devices: Sequence[Any] | None = None,
               process_count: int | None = None, loss_fn=None,
               init: finetune.InitPlan | None = None) -> TrainPlan:
    """The plan for `config`. `manifest`: the shards' manifest.json (vocabularies, tokenizers);
    None = vocabularies from the registry + config.model.vocab_overrides (AOT, no data).
    `devices`: default all; `loss_fn`: default `fourm.model.loss_fn`. `init`: the InitPlan of
    a resumed fine-tune run (its record in the workdir); None = inspect config.init.checkpoint."""
    config = ml_collections.ConfigDict(config.to_dict())  # private copy: resolved below
    # ---- mesh
    try:
        mesh = make_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    check_batch(config, mesh, process_count)
    # ---- modalities, masking, batch layout
    if manifest is not None:
        overrides = check_manifest(config, manifest, data_dir)
        del config.model["vocab_overrides"]  # re-create: a ConfigDict field keeps its first keys
        config.model.vocab_overrides = overrides
    modalities = tuple(modreg.resolve(config.model.modalities, config.model.get("family", "fourm"),
                                      dict(config.model.vocab_overrides)))
    masking = MaskingTransform.from_config(config.masking, list(modalities))
    batch_spec = masking.output_spec()
    example = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in batch_spec.items()}
    batch_sh = input_pipeline.batch_shardings(mesh, example)
    abstract_batch = {k: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype, sharding=batch_sh[k])
                      for k, (shape, dtype) in batch_spec.items()}
    # ---- model (shapes only) and what the init checkpoint gives it
    seed = int(config.seed)
    abstract_model = _abstract_model(config.model, seed)
    graphdef, abstract_params, _ = step_lib.split_model(abstract_model)
    init_cfg = config.get("init", ml_collections.ConfigDict())
    if init is None and init_cfg.get("checkpoint", ""):
        try:
            init = finetune.inspect_init(init_cfg.checkpoint, abstract_params, abstract_model.spec)
        except finetune.InitError as e:
            raise ConfigError(str(e)) from None
    freeze = tuple(init_cfg.get("freeze", ()) or ())
    if freeze and init is None:
        raise ConfigError("config.init.freeze needs config.init.checkpoint (freezing fresh "
                          "parameters would keep them random)")
    if init is not None:
        try:
            init = init.with_freeze(freeze, abstract_params)
        except finetune.InitError as e:
            raise ConfigError(str(e)) from None
    # ---- optimizer
    tx, schedule = make_optimizer(
        config.optim, config.num_train_steps, labels=None if init is None else finetune.param_labels(init),
        new_lr=float(init_cfg.get("new_lr", 0.0)))
    # ---- abstract state and its shardings

    def fresh_state():
        return step_lib.init_state(build_model(config.model, seed=seed), tx)[1]

    abstract_state = jax.eval_shape(fresh_state)
    state_sh = state_shardings(abstract_state, mesh, tx)
    abstract_state = with_shardings(abstract_state, state_sh)
    # ---- steps
    loss_fn = loss_fn or model_loss_fn
    replicated = NamedSharding(mesh, P())
    groups = step_lib.modality_groups(abstract_state["params"], list(config.model.modalities))
    train_step = jax.jit(
        step_lib.make_train_step(graphdef, loss_fn, tx, schedule, grad_accum=config.grad_accum,
                                 groups=groups),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
        donate_argnums=(0,))  # the old state's buffers become the new state's: half the memory
    eval_step = jax.jit(step_lib.make_eval_step(graphdef, loss_fn),
                        in_shardings=(state_sh, batch_sh), out_shardings=replicated)
    return TrainPlan(
        config=config, mesh=mesh, modalities=modalities,
        masking=masking, batch_spec=batch_spec, batch_shardings=batch_sh, abstract_batch=abstract_batch,
        tx=tx, schedule=schedule, graphdef=graphdef, abstract_state=abstract_state,
        state_shardings=state_sh, train_step=train_step, eval_step=eval_step, init=init,
        _fresh_state=fresh_state)
