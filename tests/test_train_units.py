"""Trainer pieces without a model: mesh, optimizer, input pipeline, checkpoints, metrics, AOT parsing."""

import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fourm.train import aot, checkpointing, input_pipeline, mesh as mesh_lib, metrics, optimizer


# ---------------------------------------------------------------------------------- mesh
def test_mesh_infers_and_builds():
    m = mesh_lib.make_mesh(dict(data=-1, fsdp=2, tensor=1))
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh_lib.mesh_shape(dict(data=2, fsdp=-1, tensor=2, dcn_data=2), 16, 2) == ((2, 2, 2), (2, 1, 1))


@pytest.mark.parametrize("cfg, match", [
    (dict(data=3, fsdp=1, tensor=1), "multiply to 3, but there are 8 devices"),
    (dict(data=-1, fsdp=3, tensor=1), "does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one"),
    (dict(data=0, fsdp=1, tensor=1), "positive or -1"),
])
def test_mesh_errors(cfg, match):
    with pytest.raises(mesh_lib.MeshConfigError, match=match):
        mesh_lib.make_mesh(cfg)


# ---------------------------------------------------------------------------------- optimizer
def _optim_cfg(**kw):
    d = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
             clip_grad=1.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def test_decay_mask_skips_norms_biases_embeddings():
    params = {"blocks": {"attn": {"qkv": jnp.ones((4, 12)), "bias": jnp.ones(12)},
                         "norm1": {"scale": jnp.ones(4)}},
              "enc": {"rgb": {"pos_emb": jnp.ones((1, 16, 4)), "mod_emb": jnp.ones((1, 1, 4)),
                              "proj": jnp.ones((48, 4))}},
              "mask_token": jnp.ones((1, 1, 4))}
    mask = optimizer.decay_mask(params)
    assert mask["blocks"]["attn"]["qkv"] and mask["enc"]["rgb"]["proj"]
    assert not any([mask["blocks"]["attn"]["bias"], mask["blocks"]["norm1"]["scale"],
                    mask["enc"]["rgb"]["pos_emb"], mask["enc"]["rgb"]["mod_emb"], mask["mask_token"]])


def test_adamw_matches_reference_and_schedule():
    tx, sched = optimizer.make_optimizer(_optim_cfg(clip_grad=0.0), total_steps=100)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(100)) == pytest.approx(1e-5, rel=1e-3)
    params = {"w": jnp.full((3, 3), 2.0), "b": jnp.full((3,), 2.0)}
    grads = {"w": jnp.zeros((3, 3)), "b": jnp.zeros((3,))}
    state = tx.init(params)
    for _ in range(11):
        updates, state = tx.update(grads, state, params)
        params_new = optax.apply_updates(params, updates)
    # Zero gradients: only decoupled weight decay moves the matrix; the bias does not move at all.
    assert float(params_new["w"][0, 0]) == pytest.approx(2.0 - 1e-3 * 0.05 * 2.0, rel=1e-4)
    assert float(params_new["b"][0]) == 2.0


def test_clipping_bounds_the_update():
    tx, _ = optimizer.make_optimizer(_optim_cfg(clip_grad=1.0, warmup_steps=0, weight_decay=0.0), 10)
    params = {"w": jnp.zeros((2,))}
    state = tx.init(params)
    clipped = optax.clip_by_global_norm(1.0).update({"w": jnp.array([300.0, 400.0])}, None)[0]
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    updates, _ = tx.update({"w": jnp.array([300.0, 400.0])}, state, params)
    assert np.all(np.isfinite(updates["w"]))


# ---------------------------------------------------------------------------------- input pipeline
def test_process_rows_reassemble_the_global_batch():
    src = np.arange(40)
    def ds(pi, pc):
        return input_pipeline.build_dataset(src, transform=lambda x, rng: (x, int(rng.integers(1 << 30))),
                                            seed=3, global_batch=8, process_index=pi, process_count=pc)
    one, halves = ds(0, 1), [ds(0, 2), ds(1, 2)]
    for step in range(7):  # crosses an epoch boundary (40 / 8 = 5 steps per epoch)
        whole = one[step]
        parts = [h[step] for h in halves]
        for a, b in zip(whole, (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))):
            np.testing.assert_array_equal(a, b)
    epoch0 = np.concatenate([one[s][0] for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(40))  # shuffled, each record once per epoch
    assert not np.array_equal(epoch0, np.concatenate([one[s][0] for s in range(5, 10)]))
    with pytest.raises(ValueError, match="not divisible"):
        input_pipeline.build_dataset(src, transform=None, seed=0, global_batch=6, process_index=0,
                                     process_count=4)


def test_iterator_state_resumes_exactly():
    ds = input_pipeline.build_dataset(np.arange(100), transform=None, seed=1, global_batch=4,
                                      process_index=0, process_count=1)
    it = input_pipeline.to_iterator(ds)
    [next(it) for _ in range(3)]
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it2 = input_pipeline.to_iterator(ds)
    it2.set_state(state)
    for a in expected:
        np.testing.assert_array_equal(a, next(it2))
    # Positioning by step (used when a checkpoint came from another process count) agrees too.
    it3 = input_pipeline.to_iterator(input_pipeline.build_dataset(
        np.arange(100), transform=None, seed=1, global_batch=4, process_index=0, process_count=1,
        start_step=3))
    np.testing.assert_array_equal(expected[0], next(it3))


# ---------------------------------------------------------------------------------- checkpoints
def _state(width=8):
    params = {"layer": {"kernel": jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width),
                        "bias": jnp.zeros(width)}}
    tx, _ = optimizer.make_optimizer(_optim_cfg(), 10)
    return {"params": params, "opt": tx.init(params), "step": jnp.array(3, jnp.int32)}


def _abstract(state):
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)


def _iterator():
    return iter(grain.MapDataset.range(50).seed(0).shuffle().repeat().batch(2).to_iter_dataset())


def test_checkpoint_roundtrip_keep_n_and_data_state(tmp_path):
    state, it = _state(), _iterator()
    ck = checkpointing.Checkpointer(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        next(it)
        ck.save(step, state, it, {"model": {"dim": 8}}, meta={"train_step_fingerprint": "ab12"})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    want_next = next(it)
    fresh = _iterator()
    restored = checkpointing.Checkpointer(tmp_path / "ck").restore_latest(_abstract(state), fresh)
    assert restored.step == 3 and restored.data_restored and restored.config == {"model": {"dim": 8}}
    assert restored.meta == {"train_step_fingerprint": "ab12"}
    assert checkpointing.saved_meta(tmp_path / "ck", 3) == restored.meta
    assert checkpointing.tree_equal(restored.state, state)
    np.testing.assert_array_equal(next(fresh), want_next)
    ck.close()


def test_restore_onto_another_mesh_reshards(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh_a = mesh_lib.make_mesh(dict(data=8, fsdp=1, tensor=1))
    mesh_b = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=2))
    x = jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16)
    state = {"w": jax.device_put(x, NamedSharding(mesh_a, P("data", None)))}
    ck = checkpointing.Checkpointer(tmp_path / "ck")
    ck.save(5, state, None, {})
    ck.wait()
    target = {"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh_b, P("fsdp", "tensor")))}
    restored = checkpointing.Checkpointer(tmp_path / "ck").restore_latest(target)
    assert restored.state["w"].sharding == target["w"].sharding
    assert restored.meta is None  # saved without meta (as checkpoints before it existed)
    assert len(restored.state["w"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(x))
    ck.close()


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    state = _state()
    ck = checkpointing.Checkpointer(tmp_path / "ck", keep=3)
    for step in (1, 2):
        ck.save(step, state, _iterator(), {})
    ck.wait()
    (tmp_path / "ck" / "2" / "state" / "manifest.ocdbt").write_bytes(b"truncated")
    (tmp_path / "ck" / "3.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save
    with caplog.at_level(logging.WARNING):
        ck2 = checkpointing.Checkpointer(tmp_path / "ck")
        restored = ck2.restore_latest(_abstract(state), _iterator())
    assert restored.step == 1
    text = caplog.text
    assert "partial checkpoint" in text and "is corrupt or partial" in text
    assert "falling back to step 1" in text
    assert (tmp_path / "ck" / "2.corrupt").exists() and ck2.all_steps() == [1]
    ck2.save(2, state, _iterator(), {})  # the re-run can write step 2 again
    ck2.wait()
    assert ck2.all_steps() == [1, 2]
    ck.close()
    ck2.close()


def test_checkpoint_of_another_model_shape_is_an_error(tmp_path):
    ck = checkpointing.Checkpointer(tmp_path / "ck")
    ck.save(1, _state(8), _iterator(), {})
    ck.wait()
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"params/layer/kernel: checkpoint has shape \(4, 8\), this model expects \(4, 16\)"):
        ck.restore_latest(_abstract(_state(16)), _iterator())
    ck.close()


def test_program_fingerprint_changes_with_the_program_and_flags(monkeypatch):
    from fourm.train import trainer
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    fp = trainer.program_fingerprint(jax.jit(lambda a: a * 2).lower(x))
    assert fp == trainer.program_fingerprint(jax.jit(lambda a: a * 2).lower(x))  # another jit, same program
    assert fp != trainer.program_fingerprint(jax.jit(lambda a: a * 3).lower(x))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true")
    assert fp != trainer.program_fingerprint(jax.jit(lambda a: a * 2).lower(x))


def test_compiled_train_step_never_recompiles_for_other_shardings():
    """The trainer's step is compiled from declared shardings: an argument sharded otherwise (say,
    restored onto another layout) is an error, not a second program with other numerics."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fourm.train import trainer
    mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(lambda s, b: (s + b.sum(0), None), in_shardings=(rep, rows), out_shardings=(rep, None),
                   donate_argnums=(0,))
    compiled, fp = trainer.compile_train_step(step, jax.ShapeDtypeStruct((4,), jnp.float32, sharding=rep),
                                              jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rows), mesh)
    assert len(fp) == 64
    out, _ = compiled(jax.device_put(jnp.zeros(4), rep), jax.device_put(jnp.ones((8, 4)), rows))
    np.testing.assert_array_equal(out, np.full(4, 8.0))
    with pytest.raises(ValueError, match="[Ss]harding"):
        compiled(jax.device_put(jnp.zeros(4), rows), jax.device_put(jnp.ones((8, 4)), rows))


# ---------------------------------------------------------------------------------- metrics
def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricWriter(tmp_path, enabled=True)
    w.write(1, {"loss": jnp.float32(2.5), "loss/rgb@64": 1.0})
    w.write(2, {"loss": float("nan")}, split="eval")
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "split": "train", "loss": 2.5, "loss/rgb@64": 1.0}
    assert rows[1]["loss"] == "nan" and rows[1]["split"] == "eval"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------- AOT plumbing
@pytest.mark.parametrize("name, grid, chips", [
    ("v5p-128", "4x4x4", 64), ("v5p-8", "2x2x1", 4), ("v4-64", "2x4x4", 32),
    ("v5e-16", "4x4", 16), ("v5litepod-256", "16x16", 256), ("v5p:2x2x2", "2x2x2", 8)])
def test_parse_topology(name, grid, chips):
    t = aot.parse_topology(name)
    assert (t.grid, t.num_chips) == (grid, chips)


def test_parse_topology_errors():
    with pytest.raises(ValueError, match="expected an accelerator type"):
        aot.parse_topology("tpu-128")
    with pytest.raises(ValueError, match="no standard v5p slice has 3 chips"):
        aot.parse_topology("v5p-6")


def test_collective_counts():
    hlo = ("%a = f32[4] all-reduce-start(f32[4] %x)\n%b = f32[4] all-reduce-done(%a)\n"
           "%c = (f32[8]) all-gather(f32[2] %y)\n%d = f32[2] reduce-scatter(f32[8] %z)")
    assert aot.collective_counts(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1}


# ---------------------------------------------------------------------------------- update step
def _linear_step(accum, poison=False):
    """The update step around a stand-in model (y = x @ w, mean squared error)."""
    from flax import nnx

    from fourm.train import step as step_lib

    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(6, dtype=jnp.float32).reshape(3, 2) / 10)

    def loss_fn(model, batch):
        err = batch["x"] @ model.w[...] - batch["y"]
        loss = jnp.mean(err ** 2)
        if poison:
            loss = loss * jnp.nan
        return loss, {"loss/lin": loss}

    tx, sched = optimizer.make_optimizer(_optim_cfg(warmup_steps=0, weight_decay=0.0), 10)
    graphdef, state = step_lib.init_state(Lin(), tx)
    groups = step_lib.modality_groups(state["params"], ["lin"])
    step = jax.jit(step_lib.make_train_step(graphdef, loss_fn, tx, sched, grad_accum=accum, groups=groups))
    return step, state


def test_gradient_accumulation_matches_one_big_batch():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
    step1, state = _linear_step(1)
    step4, _ = _linear_step(4)
    s1, m1 = step1(state, batch)
    s4, m4 = step4(state, batch)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(s4["params"]["w"][...], s1["params"]["w"][...], rtol=1e-6)
    assert int(s4["step"]) == 1


def test_nonfinite_update_is_not_applied():
    step, state = _linear_step(1, poison=True)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}
    new, m = step(state, batch)
    assert float(m["finite"]) == 0.0 and float(m["nonfinite/shared"]) == 1.0  # w names no modality
    np.testing.assert_array_equal(new["params"]["w"][...], state["params"]["w"][...])
    assert checkpointing.tree_equal(new["opt"], state["opt"]) and int(new["step"]) == 1
