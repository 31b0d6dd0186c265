"""Integrity (issue 17): checkpoint checksums and fallback, durable checkpoints, shards verified
against their manifest, paths that stay inside their folder, metrics exact across resumes.

The trainer-level cases (a corrupted shard stopping training, all checkpoints corrupt, metrics
after kill + resume) live in test_train.py next to the runs they reuse."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fourm import io as fio
from fourm.data import folder, scenes, shards
from fourm.train import checkpointing, metrics

REPO = Path(__file__).resolve().parents[1]


def flip_bytes(path: Path, n: int = 64, at: float = 0.5) -> None:
    """Same-size corruption: invert `n` bytes at `at` (a fraction of the size, or a byte offset)."""
    b = bytearray(path.read_bytes())
    i = int(len(b) * at) if isinstance(at, float) else at
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(bytes(b))


def largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------------- fourm.io.inside
def test_inside_refuses_symlinks_and_dotdot_leaving_the_folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.txt").write_text("x")
    (root / "sub" / "link.txt").symlink_to(root / "sub" / "ok.txt")  # inside: fine
    (root / "sub" / "evil.txt").symlink_to("/etc/passwd")
    assert fio.inside(root, "sub/ok.txt") == root / "sub" / "ok.txt"
    assert fio.inside(root, "sub/link.txt") == root / "sub" / "link.txt"
    with pytest.raises(fio.PathEscapeError, match=r"evil.txt resolves to /etc/passwd, outside its folder"):
        fio.inside(root, "sub/evil.txt", "caption file")
    with pytest.raises(fio.PathEscapeError, match="outside its folder"):
        fio.inside(root, "../data2/x")
    # The folder itself may be a symlink (the user's choice where data lives).
    (tmp_path / "alias").symlink_to(root)
    assert fio.inside(tmp_path / "alias", "sub/ok.txt").read_text() == "x"


# ----------------------------------------------------------------------------------- checksums
def test_checksums_see_one_changed_word_nan_and_ignore_sharding():
    mesh = jax.make_mesh((8,), ("data",))
    x = jax.random.normal(jax.random.key(0), (64, 16))
    tree = {"w": x, "h": x.astype(jnp.bfloat16), "i": jnp.arange(5), "k": jax.random.key(1)}
    sums, bad = checkpointing.array_checksums(tree)
    assert bad == {} and set(sums) == {"['w']", "['h']", "['i']", "['k']"}
    sharded = dict(tree, w=jax.device_put(x, NamedSharding(mesh, P("data", None))))
    assert checkpointing.array_checksums(sharded)[0] == sums  # exact integer sums: any layout
    saved = dict(algorithm=checkpointing.CHECKSUM_ALGORITHM, arrays=sums)
    assert checkpointing.verify_arrays(tree, saved) == []
    one_bit = np.asarray(x).copy()
    one_bit.view(np.uint32)[7, 3] ^= 1  # the least significant mantissa bit of one value
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    for changed in (one_bit, swapped):
        problems = checkpointing.verify_arrays(dict(tree, w=jnp.asarray(changed)), saved)
        assert problems == [f"['w'] does not match its checksum (saved {sums['''['w']''']}, read "
                            f"{checkpointing.array_checksums({'w': jnp.asarray(changed)})[0]['''['w']''']})"]
    nan = dict(tree, h=tree["h"].at[2, 2].set(jnp.nan))
    assert any("['h'] holds 1 NaN/Inf values" == p for p in checkpointing.verify_arrays(nan, saved))
    assert checkpointing.verify_arrays(nan, None) == ["['h'] holds 1 NaN/Inf values"]  # old checkpoints


# ----------------------------------------------------------------------------------- checkpoints
def _state(seed=0):
    k = jax.random.key(seed)
    return {"params": {"w": jax.random.normal(k, (128, 128)), "b": jnp.zeros(128)},
            "step": jnp.array(3, jnp.int32)}


def _abstract(state):
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)


def _saved(tmp_path, steps=(1, 2)) -> Path:
    d = tmp_path / "ck"
    ck = checkpointing.Checkpointer(d, keep=5)
    for s in steps:
        ck.save(s, _state(s), None, {})
    ck.wait()
    ck.close()
    return d


def test_same_size_corruption_of_the_newest_checkpoint_falls_back(tmp_path, caplog):
    d = _saved(tmp_path)
    flip_bytes(largest_file(d / "2"))
    with caplog.at_level(logging.WARNING):
        ck = checkpointing.Checkpointer(d)
        restored = ck.restore_latest(_abstract(_state()))
    assert restored.step == 1 and checkpointing.tree_equal(restored.state, _state(1))
    assert f"checkpoint {d / '2'} is corrupt" in caplog.text and "falling back to step 1" in caplog.text
    assert "does not match its checksum" in caplog.text or "Error" in caplog.text
    assert (d / "2.corrupt").is_dir() and ck.all_steps() == [1]
    ck.close()


def test_nonfinite_parameters_make_a_checkpoint_corrupt(tmp_path, caplog):
    d = tmp_path / "ck"
    ck = checkpointing.Checkpointer(d)
    ck.save(1, _state(1), None, {})
    bad = _state(2)
    bad["params"]["b"] = bad["params"]["b"].at[5].set(jnp.inf)
    ck.save(2, bad, None, {})
    ck.wait()
    with caplog.at_level(logging.WARNING):
        restored = checkpointing.Checkpointer(d).restore_latest(_abstract(_state()))
    assert restored.step == 1 and "['params']['b'] holds 1 NaN/Inf values" in caplog.text
    ck.close()


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    d = _saved(tmp_path)
    for s in (1, 2):
        flip_bytes(largest_file(d / str(s)))
    with pytest.raises(checkpointing.CheckpointCorruptError, match=r"no good checkpoint in .*1\.corrupt, 2\.corrupt"):
        checkpointing.Checkpointer(d).restore_latest(_abstract(_state()))
    # The next attempt does not silently start from scratch over the set-aside ones either.
    with pytest.raises(checkpointing.CheckpointCorruptError, match="remove the \\*.corrupt folders"):
        checkpointing.Checkpointer(d).restore_latest(_abstract(_state()))
    assert issubclass(checkpointing.CheckpointCorruptError, checkpointing.CheckpointMismatchError)


def test_checkpoint_file_escaping_its_folder_is_corrupt(tmp_path, caplog):
    d = _saved(tmp_path)
    target = largest_file(d / "2")
    outside = tmp_path / "elsewhere.bin"
    shutil.move(target, outside)
    target.symlink_to(outside)
    with caplog.at_level(logging.WARNING):
        restored = checkpointing.Checkpointer(d).restore_latest(_abstract(_state()))
    assert restored.step == 1 and "outside its folder" in caplog.text


def test_durable_at_the_next_step_boundary(tmp_path):
    ck = checkpointing.Checkpointer(tmp_path / "ck", durable_within_steps=1)
    ck.save(1, _state(), None, {})
    ck.step_boundary(1)  # the save's own step: no wait required yet
    ck.step_boundary(2)
    assert (tmp_path / "ck" / "1").is_dir() and not ck.manager.is_saving_in_progress()
    assert 1 in ck.durable_s and ck.durable_s[1] > 0
    ck.close()


# ----------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from fourm.bench.shards import make_scene_shards
    d = tmp_path_factory.mktemp("shards")
    make_scene_shards(d, num_scenes=8, shard_size=4, modalities=("tok_rgb@64", "caption"))
    return d


@pytest.fixture()
def shard_copy(shard_dir, tmp_path):
    return Path(shutil.copytree(shard_dir, tmp_path / "copy"))


def test_same_size_corrupted_shard_is_named_with_its_record(shard_copy):
    shards.open_shards(shard_copy)  # intact: verifies
    bad = shard_copy / "shard-00001-of-00002.array_record"
    original = bad.read_bytes()
    flip_bytes(bad, at=600)  # inside the second record (the shard holds 4 records of ~450 bytes)
    shards.open_shards(shard_copy, verify=False)  # the cheap checks cannot see it
    with pytest.raises(shards.ShardError, match=r"shard-00001-of-00002.array_record does not match the "
                                                r"sha256.*record 1 of 4 is damaged"):
        shards.open_shards(shard_copy)
    # Bytes no record covers (Riegeli pads to 64 KiB blocks): every record reads, sha256 still says no.
    bad.write_bytes(original)
    flip_bytes(bad, at=0.9)
    with pytest.raises(shards.ShardError, match="00001-of-00002.*all 4 records still read"):
        shards.open_shards(shard_copy)


def test_shard_paths_stay_inside_the_folder(shard_copy, tmp_path):
    name = "shard-00000-of-00002.array_record"
    moved = tmp_path / name
    shutil.move(shard_copy / name, moved)
    (shard_copy / name).symlink_to(moved)
    with pytest.raises(fio.PathEscapeError, match=f"shard file .*{name} resolves to .*outside its folder"):
        shards.open_shards(shard_copy)
    man = json.loads((shard_copy / "manifest.json").read_text())
    man["shards"][0]["file"] = f"../{name}"
    (shard_copy / name).unlink()
    (shard_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(fio.PathEscapeError, match="outside its folder"):
        shards.open_shards(shard_copy)


# ----------------------------------------------------------------------------------- aligned folders
@pytest.fixture()
def evil_folder(tmp_path):
    root = tmp_path / "scenes"
    scenes.export_scenes(root, 0, 0, 2, 32, workers=1, progress=False)
    cap = root / "caption" / "000000.txt"
    cap.unlink()
    cap.symlink_to("/etc/passwd")
    return root


def test_validate_reports_a_symlink_leaving_the_folder(evil_folder):
    errors = folder.AlignedFolder(evil_folder).validate(raise_errors=False)
    assert len(errors) == 1 and errors[0].sample == "000000" and errors[0].modality == "caption"
    assert "resolves to /etc/passwd, outside its folder" in str(errors[0])
    r = subprocess.run([sys.executable, "-m", "fourm.cli.scenes", "validate", str(evil_folder)],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 1 and "1 bad" in r.stdout and "/etc/passwd" in r.stdout, r.stdout + r.stderr


def test_dataset_json_symlink_leaving_the_folder_is_refused(evil_folder, tmp_path):
    spec = evil_folder / "dataset.json"
    shutil.move(spec, tmp_path / "dataset.json")
    spec.symlink_to(tmp_path / "dataset.json")
    with pytest.raises(folder.FolderError, match="dataset.json.*outside its folder"):
        folder.AlignedFolder(evil_folder)


# ----------------------------------------------------------------------------------- metrics
def _tb_events(tb_dir: Path) -> list:
    """Every event of every file in `tb_dir` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    out = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            out.append(ev)
            i += 12 + n + 4
    return out


def test_resume_drops_later_rows_and_purges_tensorboard(tmp_path):
    w = metrics.MetricWriter(tmp_path, enabled=True)
    for s in range(1, 7):
        w.write(s, {"loss": 10.0 - s})
    w.write(4, {"loss": 1.0}, split="eval")
    w.write(6, {"loss": 1.0}, split="eval")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "spl')  # a torn last line of a killed run
    w = metrics.MetricWriter(tmp_path, enabled=True)
    assert w.resume_at(4) == 4  # train 5, 6, eval 6 and the torn line
    for s in (5, 6):
        w.write(s, {"loss": 20.0 - s})
    w.close()
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl", split=None)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"),
                                                       (4, "train"), (4, "eval"), (5, "train"), (6, "train")]
    assert rows[-1]["loss"] == 14.0 and metrics.last_row(tmp_path / "metrics.jsonl", 6) == {"loss": 14.0}
    events = _tb_events(tmp_path / "tb")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [5]  # TensorBoard drops the first run's events from step 5 on
    assert not list(tmp_path.glob(".metrics.jsonl.tmp*"))


# ----------------------------------------------------------------------------------- benchmark
def test_integrity_benchmark_group_runs_on_tiny_shapes():
    """`fourm-bench --only integrity` (the suite group over fourm.bench.integrity), tiny shapes."""
    from fourm.bench import suite
    from fourm.config import load_config

    c = load_config("bench:quick", ["integrity.state_mib=1", "integrity.steps=2", "integrity.scenes=8"])
    results = {r.name: r for r in suite.run_group("integrity", c)}
    assert set(results) == {"integrity.ckpt_durable.within_1", "integrity.ckpt_durable.within_m1",
                            "integrity.shard_sha256"}
    for policy in ("1", "m1"):
        r = results[f"integrity.ckpt_durable.within_{policy}"]
        assert r.extra["state_bytes"] >= 1 << 20 and 0 < r.extra["blocked_s"] <= r.seconds < 60
        assert 0 <= r.extra["steps_in_window"] <= 2
    s = results["integrity.shard_sha256"]
    assert s.extra["bytes"] > 0 and s.seconds > 0 and s.throughput > 0 and s.unit == "MB/s"
