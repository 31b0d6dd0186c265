"""Fine-tuning (`config.init`): load a fourm export or an official 4M folder, new modalities fresh,
shape errors listed, frozen parameters, a resume that never reads the init checkpoint again."""

import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fourm.bench.shards import make_scene_shards
from fourm.compat import ml4m
from fourm.config import load_config
from fourm.model import build_model, load_pretrained, save_pretrained
from fourm.model.pretrained import flat_params
from fourm.model.synthetic import synthetic_batch
from fourm.data.shards import open_shards
from fourm.train import checkpointing, finetune, trainer
from fourm.train.plan import ConfigError, build_plan

PRE = ["rgb@64", "tok_rgb@64", "tok_depth@64"]  # what the "pretrained" model knows
NEW = "tok_normal@64"  # the modality fine-tuning adds
VOCAB = {"tok_rgb@64": 64, "tok_depth@64": 32, "tok_normal@64": 64}  # the patch quantizers'
TINY = ["model.dim=32", "model.num_heads=2", "model.encoder_depth=1", "model.decoder_depth=1",
        "model.mlp_hidden=64", "batch_size=8", "eval_every=0", "log_every=1", "ckpt_every=1",
        "masking.input_budget=16", "masking.target_budget=16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_shards")
    make_scene_shards(out, num_scenes=16, shard_size=8, modalities=PRE + [NEW])
    return out


def tiny_model_cfg(mods, **kw):
    c = load_config("pretrain:smoke", TINY).model
    c.modalities = tuple(mods)
    c.vocab_overrides = {m: VOCAB[m] for m in mods if m in VOCAB}
    c.update(**kw)
    return c


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A 'pretrained' fourm export of the smaller modality set (built, not trained: the tests
    check that its exact values arrive)."""
    out = tmp_path_factory.mktemp("export")
    save_pretrained(build_model(tiny_model_cfg(PRE), seed=7), None, out)
    return out


def ft_config(shards, export, extra=()):
    return load_config("pretrain:smoke", [
        f"data.dir={shards}", *TINY, "num_train_steps=3", f"init.checkpoint={export}", *extra,
    ] + [f"model.modalities={json.dumps(PRE + [NEW])}"])


def test_plan_loads_matching_and_names_new_parameters(shards, export):
    cfg = ft_config(shards, export)
    plan = build_plan(cfg, open_shards(shards)[1], data_dir=str(shards))
    assert plan.init is not None and plan.init.kind == "fourm"
    assert plan.init.new and all(NEW in n for n in plan.init.new)
    assert {"mod_emb/tok_normal@64", "dec_embed/tok_normal@64/to_logits"} <= set(plan.init.new)
    assert not plan.init.unused
    saved = {k: np.asarray(v) for k, v in flat_params(nnx.state(build_model(tiny_model_cfg(PRE), seed=7),
                                                                   nnx.Param)).items()}
    state = plan.init_state()
    got = {finetune.param_name(p): np.asarray(x)
           for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert set(plan.init.loaded) == set(saved)
    for name in plan.init.loaded:
        np.testing.assert_array_equal(got[name], saved[name], err_msg=name)
    assert not cfg.model.vocab_overrides  # the caller's config is never modified


def test_shape_mismatch_is_one_error_listing_everything(shards, tmp_path):
    bad = tmp_path / "bad"
    save_pretrained(build_model(tiny_model_cfg(PRE, num_heads=4, dim=48, mlp_hidden=64), seed=0), None, bad)
    with pytest.raises(ConfigError) as e:
        build_plan(ft_config(shards, bad), open_shards(shards)[1], data_dir=str(shards))
    msg = str(e.value)
    assert "model.dim: checkpoint 48, config 32" in msg and "model.num_heads: checkpoint 4, config 2" in msg
    assert "encoder/attn/qkv: checkpoint shape" in msg and "mask_token: checkpoint shape (48,), model (32,)" in msg
    # a vocabulary that differs: exactly the parameters of that modality are named
    vocab = tmp_path / "vocab"
    c = tiny_model_cfg(PRE)
    c.vocab_overrides = {"tok_rgb@64": 64, "tok_depth@64": 16}
    save_pretrained(build_model(c, seed=0), None, vocab)
    with pytest.raises(ConfigError, match=r"\(2 differences\): dec_embed/tok_depth@64/to_logits: checkpoint "
                       r"shape \(16, 32\), model \(32, 32\); enc_embed/tok_depth@64/token_emb"):
        build_plan(ft_config(shards, vocab), open_shards(shards)[1], data_dir=str(shards))
    with pytest.raises(ConfigError, match="does not exist"):
        build_plan(ft_config(shards, tmp_path / "nowhere"), open_shards(shards)[1], data_dir=str(shards))


def test_freeze_patterns(shards, export):
    manifest = open_shards(shards)[1]
    with pytest.raises(ConfigError, match=r"patterns \['encoderr/\*'\] match no parameter"):
        build_plan(ft_config(shards, export, ['init.freeze=["encoder/*","encoderr/*"]']), manifest, data_dir=str(shards))
    with pytest.raises(ConfigError, match="frozen they would stay at their random initialisation"):
        build_plan(ft_config(shards, export, ['init.freeze=["*tok_normal@64*"]']), manifest, data_dir=str(shards))
    with pytest.raises(ConfigError, match="needs config.init.checkpoint"):
        build_plan(ft_config(shards, "", ['init.freeze=["encoder/*"]']), manifest, data_dir=str(shards))
    plan = build_plan(ft_config(shards, export, ['init.freeze=["encoder/*","enc_embed/tok_rgb@64/*"]']),
                      manifest, data_dir=str(shards))
    assert plan.init.frozen and all(n.startswith(("encoder/", "enc_embed/tok_rgb@64/")) for n in plan.init.frozen)


def test_finetune_run_freezes_and_resumes_without_the_init(shards, export, tmp_path, caplog,
                                                           monkeypatch):
    """Preempted (a real SIGTERM, sent once step 2's checkpoint is saved) after step 2 of 3; the
    init checkpoint is then moved away and the run resumes from its own checkpoint: the init is
    never read again."""
    save = checkpointing.Checkpointer.save

    def save_then_sigterm(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    init = tmp_path / "init"
    shutil.copytree(export, init)
    workdir = tmp_path / "run"
    cfg = ft_config(shards, init, ['init.freeze=["encoder/*"]', "init.new_lr=0.01"])
    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_sigterm)
    with caplog.at_level(logging.INFO, logger="fourm.train"):
        r1 = trainer.train(cfg, str(workdir))
    assert r1.preempted and r1.step == 2
    assert "new (fresh init): ['dec_embed/tok_normal@64/pos" in caplog.text or (
        "new (fresh init)" in caplog.text and "tok_normal@64" in caplog.text)
    record = json.loads((workdir / "init.json").read_text())
    assert record["source"] == str(init) and record["freeze"] == ["encoder/*"]
    shutil.rmtree(init)  # a resume that touched the init would fail now
    monkeypatch.setattr(checkpointing.Checkpointer, "save", save)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fourm.train"):
        r2 = trainer.train(ft_config(shards, init, ['init.freeze=["encoder/*"]', "init.new_lr=0.01"]), str(workdir))
    assert r2.step == 3 and not r2.preempted
    assert "resumed from step 2" in caplog.text and "initialised from" not in caplog.text
    # frozen: still the checkpoint's values after 3 updates; the rest moved
    saved = flat_params(nnx.state(build_model(tiny_model_cfg(PRE), seed=7), nnx.Param))
    final = flat_params(nnx.state(load_pretrained(workdir / "export"), nnx.Param))
    for name in record["frozen"]:
        np.testing.assert_array_equal(np.asarray(final[name]), np.asarray(saved[name]), err_msg=name)
    moved = [n for n in record["loaded"] if n not in record["frozen"]
             and not np.array_equal(np.asarray(final[n]), np.asarray(saved[n]))]
    assert "decoder/cross_attn/q" in moved and "context_proj" in moved


def test_finetune_from_official_4m_checkpoint_with_a_new_modality(shared_dir):
    """The converted tiny 4M model (../shared/fixtures/ml4m/tiny_swiglu) plus tok_normal@224."""
    src = shared_dir / "fixtures" / "ml4m" / "tiny_swiglu"
    spec = ml4m.spec_from_ml4m(ml4m.read_ml4m_config(src), verbose=False)
    cfg = load_config("pretrain:smoke", ["batch_size=8", "masking.input_budget=16", "optim.warmup_steps=0",
                                         "masking.target_budget=16"])
    model_cfg = spec.to_config()
    mods = list(spec.names) + ["tok_normal@224"]
    model_cfg.update(family="ml4m", modalities=mods, domains_in=list(spec.domains_in) + ["tok_normal@224"],
                     domains_out=list(spec.domains_out) + ["tok_normal@224"], vocab_overrides={},
                     scan_layers=True, remat="none")
    del cfg["model"]
    cfg.model = model_cfg
    cfg.init.checkpoint = str(src)
    cfg.init.freeze = ("encoder/*",)
    plan = build_plan(cfg)
    assert plan.init.kind == "ml4m"
    assert set(plan.init.new) == {"dec_embed/tok_normal@224/to_logits", "enc_embed/tok_normal@224/token_emb",
                                  "mod_emb/tok_normal@224"}
    state = plan.init_state()
    ref = flat_params(nnx.state(ml4m.load(src), nnx.Param))
    got = {finetune.param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    for name in plan.init.loaded:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)
    # one update step: finite, frozen encoder untouched, the new head moves
    step, _ = plan.compile_train_step()
    model = nnx.eval_shape(lambda: build_model(plan.config.model))
    batch = synthetic_batch(model.spec, 8, 16, 16, seed=0)
    batch = {k: jax.device_put(jnp.asarray(batch[k], v.dtype), plan.batch_shardings[k])
             for k, v in plan.abstract_batch.items()}
    before = {n: np.asarray(got[n]) for n in ("encoder/attn/qkv", "dec_embed/tok_normal@224/to_logits")}
    with jax.set_mesh(plan.mesh):
        state, m = step(state, batch)
    assert np.isfinite(float(m["loss"]))
    after = {finetune.param_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    np.testing.assert_array_equal(after["encoder/attn/qkv"], before["encoder/attn/qkv"])
    assert not np.array_equal(after["dec_embed/tok_normal@224/to_logits"], before["dec_embed/tok_normal@224/to_logits"])
