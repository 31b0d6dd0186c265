"""Pre-tokenization into ArrayRecord shards: record contents, manifest, resumption, readers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fourm.data.scenes import generate_scene
from fourm.tokenizers import pretokenize as P
from fourm.tokenizers import structure
from fourm.tokenizers.sources import SceneSource
from fourm.tokenizers.text import TextTokenizer

MODS = ["rgb@64", "tok_rgb@64", "tok_depth@64", "caption", "det", "metadata"]


class BlockTokenizer:
    """Deterministic stand-in for an ImageTokenizer: block means quantised to `vocab_size` levels."""

    version = "block/1"

    def __init__(self, lo, hi, vocab_size=64, patch=8):
        self.lo, self.hi, self.vocab_size, self.patch = lo, hi, vocab_size, patch
        self.config_hash = f"block-{lo}-{hi}-{vocab_size}"
        self.calls = []

    def encode(self, x):
        x = np.asarray(x, np.float64)
        self.calls.append(x.shape)
        x = x.mean(-1) if x.ndim == 4 else x
        b, h, w = x.shape
        p = self.patch
        m = x.reshape(b, h // p, p, w // p, p).mean((2, 4))
        q = np.floor((m - self.lo) / (self.hi - self.lo) * self.vocab_size)
        return np.clip(q, 0, self.vocab_size - 1).astype(np.int32)


class FailingSource:
    """Scenes, except that sample `bad` raises (a run killed in the middle of a shard)."""

    def __init__(self, count, bad):
        self.inner, self.bad = SceneSource(0, 0, count, 64), bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.bad:
            raise RuntimeError("simulated crash")
        return self.inner[i]


@pytest.fixture(scope="module")
def text_tok():
    caps = [generate_scene(0, i, 32)["caption"] for i in range(40)]
    return TextTokenizer.train(caps, None, {})


def _toks():
    return {"tok_rgb@64": BlockTokenizer(0, 255), "tok_depth@64": BlockTokenizer(0.0, 10.0)}


def _run(out, source, text_tok, **kw):
    kw = dict(dict(modalities=MODS, image_tokenizers=_toks(), text_tokenizer=text_tok,
                   shard_size=4, batch_size=3, source_info={"kind": "test"}, progress=False), **kw)
    return P.pretokenize(source, out, **kw)


def test_records_and_manifest(tmp_path, text_tok):
    toks = _toks()
    m = _run(tmp_path, SceneSource(0, 0, 10, 64), text_tok, image_tokenizers=toks)
    assert [s["num_records"] for s in m["shards"]] == [4, 4, 2]
    assert all(shape[0] == 3 for shape in toks["tok_rgb@64"].calls)  # padded: one static shape
    ds, man = P.open_shards(tmp_path, verify=True)
    assert len(ds) == 10 and man == json.loads((tmp_path / "manifest.json").read_text())
    assert man["modalities"]["tok_rgb@64"]["tokenizer"]["config_hash"] == "block-0-255-64"
    assert man["modalities"]["caption"]["tokenizer"]["config_hash"] == text_tok.config_hash
    assert man["modalities"]["caption"]["vocab_size"] == text_tok.vocab_size
    assert man["text"]["value_bins"] == text_tok.value_bins
    assert man["benchmark"]["samples"] == 10 and man["benchmark"]["samples_per_second"] > 0
    assert 0 < man["benchmark"]["cores_busy"] <= man["benchmark"]["cores"] + 0.5  # CPU s / wall s
    for i in (0, 5, 9):
        rec = P.decode_record(ds[i])
        s = generate_scene(0, i, 64)
        assert set(rec) == set(MODS) | {"_index"} and int(rec["_index"]) == i
        np.testing.assert_array_equal(rec["rgb@64"], s["rgb"])
        assert rec["tok_rgb@64"].dtype == np.int16 and rec["tok_rgb@64"].shape == (8, 8)
        np.testing.assert_array_equal(rec["tok_depth@64"], BlockTokenizer(0.0, 10.0).encode(s["depth"][None])[0])
        assert rec["caption"].dtype == np.int32
        assert text_tok.decode(rec["caption"]) == s["caption"]
        boxes = structure.text_to_boxes(text_tok.decode(rec["det"]), 64, text_tok.value_bins)
        assert [b["class"] for b in boxes] == [b["class"] for b in s["boxes"]]
        meta = structure.text_to_metadata(text_tok.decode(rec["metadata"]), bins=text_tok.value_bins)
        assert meta["object_count"] == s["metadata"]["object_count"]
    dec, _ = P.open_shards(tmp_path, decode=True)
    np.testing.assert_array_equal(dec[3]["caption"], P.decode_record(ds[3])["caption"])


def test_killed_run_leaves_no_readable_partial_data_and_resumes(tmp_path, text_tok):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, FailingSource(10, bad=6), text_tok)
    # Shard 0 finished; shard 1 (samples 4..7) died mid-way and is only a temporary file.
    assert sorted(p.name for p in tmp_path.glob("*.array_record")) == ["shard-00000-of-00003.array_record"]
    assert any(p.name.startswith(".shard-00001") for p in (tmp_path / ".work").iterdir())
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        P.open_shards(tmp_path)
    first = (tmp_path / "shard-00000-of-00003.array_record").stat().st_mtime_ns
    m = _run(tmp_path, SceneSource(0, 0, 10, 64), text_tok)
    assert m["benchmark"]["samples"] == 6  # shard 0 was skipped
    assert (tmp_path / "shard-00000-of-00003.array_record").stat().st_mtime_ns == first
    assert not any(p.name.startswith(".") for p in (tmp_path / ".work").iterdir())
    # Same bytes as an uninterrupted run.
    fresh = tmp_path / "fresh"
    m2 = _run(fresh, SceneSource(0, 0, 10, 64), text_tok)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in m2["shards"]]
    # Re-running a finished job does no work and leaves the data as it was.
    m3 = _run(fresh, SceneSource(0, 0, 10, 64), text_tok)
    assert m3["benchmark"]["samples"] == 0 and m3["shards"] == m2["shards"]


def test_resume_with_other_config_is_refused(tmp_path, text_tok):
    with pytest.raises(RuntimeError, match="fail_after_shards"):
        _run(tmp_path, SceneSource(0, 0, 6, 64), text_tok, fail_after_shards=1)
    with pytest.raises(ValueError, match="different pre-tokenization run"):
        _run(tmp_path, SceneSource(0, 0, 6, 64), text_tok, shard_size=2)
    m = _run(tmp_path, SceneSource(0, 0, 6, 64), text_tok, shard_size=2, overwrite=True)
    assert len(m["shards"]) == 3 and len(list(tmp_path.glob("*.array_record"))) == 3


def test_reader_rejects_inconsistent_dirs(tmp_path, text_tok):
    _run(tmp_path, SceneSource(0, 0, 5, 64), text_tok)
    stray = tmp_path / "shard-00009-of-00010.array_record"
    stray.write_bytes(b"")
    with pytest.raises(ValueError, match="not listed in its manifest.*shard-00009"):
        P.open_shards(tmp_path)
    stray.unlink()
    shard = tmp_path / "shard-00001-of-00002.array_record"
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00002.array_record listed in"):
        P.open_shards(tmp_path)
    shard.write_bytes(data + b"x")
    with pytest.raises(ValueError, match="bytes, manifest says"):
        P.open_shards(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(man, format="other/9")))
    with pytest.raises(ValueError, match="format 'other/9'"):
        P.open_shards(tmp_path)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        P.decode_record(b"\x00" * 12)


def test_input_errors(tmp_path, text_tok):
    with pytest.raises(ValueError, match="needs an image tokenizer"):
        _run(tmp_path, SceneSource(0, 0, 2, 64), text_tok, image_tokenizers={})
    with pytest.raises(ValueError, match="not in modalities"):
        _run(tmp_path, SceneSource(0, 0, 2, 64), text_tok, modalities=["caption"])
    with pytest.raises(ValueError, match=r"is uint8 \(32, 32, 3\), expected uint8 \(64, 64, 3\)"):
        _run(tmp_path / "b", SceneSource(0, 0, 2, 32), text_tok, modalities=["rgb@64"],
             image_tokenizers={})


def test_workers_match_in_process(tmp_path, text_tok):
    a = _run(tmp_path / "a", SceneSource(0, 3, 6, 64), text_tok, workers=2)
    b = _run(tmp_path / "b", SceneSource(0, 3, 6, 64), text_tok, workers=0)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_cli_text_only(tmp_path, text_tok):
    text_tok.save(tmp_path / "text")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "fourm.cli.pretokenize", "--config",
           "configs/pretokenize.py:text,smoke", f"--config.text_tokenizer={tmp_path / 'text'}",
           f"--config.out_dir={tmp_path / 'out'}", "--config.source.count=5", "--config.workers=0"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "samples/s" in r.stdout
    ds, man = P.open_shards(tmp_path / "out")
    assert len(ds) == 5 and list(man["modalities"]) == ["rgb@64", "caption", "det", "metadata"]


def test_with_real_image_tokenizer(tmp_path):
    """The real ImageTokenizer interface (tiny model, random weights: tokens, not quality)."""
    from flax import nnx

    from fourm.config import load_config
    from fourm.tokenizers.image import WEIGHTS, ImageTokenizer, build_model

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "tokenizers", "depth.py:64,tiny"))
    _, model = build_model(cfg)
    _, weights, _ = nnx.split(model, WEIGHTS, ...)
    tok = ImageTokenizer(cfg, weights)
    m = P.pretokenize(SceneSource(0, 0, 5, 64), tmp_path, modalities=["tok_depth@64"],
                      image_tokenizers={"tok_depth@64": tok}, shard_size=5, batch_size=4,
                      progress=False)
    assert m["modalities"]["tok_depth@64"]["tokenizer"]["version"] == tok.version
    ds, _ = P.open_shards(tmp_path, decode=True)
    # Batch of 4, as pretokenize's (padded) batches: the compiled function is reused.
    want = tok.encode(np.stack([generate_scene(0, i, 64)["depth"] for i in (1, 2, 3, 4)]))
    for k, i in enumerate((1, 2, 3, 4)):
        np.testing.assert_array_equal(ds[i]["tok_depth@64"], want[k])


def test_aligned_folder_source_matches_generator(tmp_path, text_tok):
    from fourm.data.folder import write_dataset
    from fourm.tokenizers.sources import FolderSource, make_source
    import ml_collections

    scenes = [generate_scene(0, i, 64) for i in range(3)]
    write_dataset(tmp_path / "folder", scenes, 64)
    src = make_source(ml_collections.ConfigDict(dict(kind="folder", folder=str(tmp_path / "folder"),
                                                     start=1, count=-1)))
    assert isinstance(src, FolderSource) and len(src) == 2
    a = _run(tmp_path / "a", src, text_tok, workers=0)
    b = _run(tmp_path / "b", SceneSource(0, 1, 2, 64), text_tok, workers=0)
    da, db = P.open_shards(tmp_path / "a", decode=True)[0], P.open_shards(tmp_path / "b", decode=True)[0]
    for i in range(2):
        for name in ("rgb@64", "tok_rgb@64", "caption", "det", "metadata"):
            np.testing.assert_array_equal(da[i][name], db[i][name], err_msg=name)
    assert a["source"] == {"kind": "test"}


def test_prefetch_keeps_order_and_raises_the_producers_error():
    assert list(P.prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise KeyError("sample 7 has no field 'rgb'")

    got = []
    with pytest.raises(KeyError, match="sample 7"):
        for x in P.prefetch(broken()):
            got.append(x)
    assert got == [1]
    early = P.prefetch(iter(range(1000)), depth=2)
    assert next(early) == 0
    early.close()  # the consumer stops: the producer thread ends instead of blocking


def test_symlink_leaving_an_aligned_folder_is_refused(tmp_path, text_tok):
    """A dataset cannot make pre-tokenization read a file outside it (issue 17: /etc/passwd was
    tokenized into a shard)."""
    from fourm.data.folder import FolderError
    from fourm.data.scenes import export_scenes
    from fourm.tokenizers.sources import FolderSource

    root = tmp_path / "scenes"
    export_scenes(root, 0, 0, 2, 32, workers=1, progress=False)
    (root / "caption" / "000001.txt").unlink()
    (root / "caption" / "000001.txt").symlink_to("/etc/passwd")
    with pytest.raises(FolderError, match=r"sample '000001', modality 'caption'.*resolves to /etc/passwd, "
                                          r"outside its folder"):
        _run(tmp_path / "out", FolderSource(str(root)), text_tok, modalities=["caption"],
             image_tokenizers={})
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.array_record"))
