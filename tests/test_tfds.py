"""TFDS builders: aligned folder / scene generator -> ArrayRecord -> numpy, exactly, without TF."""

from __future__ import annotations

import pickle
import shutil
import sys

import numpy as np
import pytest

from fourm.data import folder, scenes

tfds = pytest.importorskip("tensorflow_datasets")
from fourm.data import tfds_scenes  # noqa: E402

SEED, NUM, RES = 11, 5, 32


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
        else:
            assert type(a[k]) is type(b[k]) and a[k] == b[k], k


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds") / "scenes"
    scenes.export_scenes(root, SEED, 0, NUM, RES, progress=False)
    return root


def test_folder_to_tfds_round_trips_exactly(scene_folder, tmp_path):
    path = tfds_scenes.build_from_folder(scene_folder, tmp_path / "tfds", name="my_scenes")
    assert path == tmp_path / "tfds" / "my_scenes" / "1.0.0"
    assert any(p.name.startswith("my_scenes-train.array_record") for p in path.iterdir())
    f = folder.AlignedFolder(scene_folder)
    src = tfds_scenes.SampleSource(path)
    assert len(src) == len(f) == NUM
    for i in range(NUM):
        assert src.stem(i) == f.stems[i]  # sample order is kept
        assert_same(f[i], src[i])
    # The plain tfds entry point (what grain pipelines use) reads the same records.
    raw = tfds.data_source("my_scenes", data_dir=str(tmp_path / "tfds"), split="train")
    assert raw[3]["rgb"].dtype == np.uint8 and raw[3]["semseg"].shape == (RES, RES, 1)
    assert_same(tfds_scenes.record_to_sample(raw[3]), f[3])
    assert src.metadata["classes"] == scenes.CLASSES and src.metadata["resolution"] == [RES, RES]
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow
    # Picklable for grain worker processes, and usable as a grain source.
    src2 = pickle.loads(pickle.dumps(src))
    assert_same(src2[1], f[1])
    import grain

    ds = grain.MapDataset.source(src).map(lambda s: s["depth"].mean())
    assert ds[2] == pytest.approx(f[2]["depth"].mean())


def test_generator_builder_matches_folder_path(scene_folder, tmp_path):
    path = tfds_scenes.build_from_scenes(tmp_path / "tfds", seed=SEED, resolution=RES, num=3, num_val=2)
    f = folder.AlignedFolder(scene_folder)
    train, val = tfds_scenes.SampleSource(path, "train"), tfds_scenes.SampleSource(path, "validation")
    assert (len(train), len(val)) == (3, 2)
    for i in range(3):
        assert train.stem(i) == f.stems[i]
        assert_same(train[i], f[i])
    for i in range(2):
        assert val.stem(i) == f.stems[3 + i]
        assert_same(val[i], f[3 + i])
    with pytest.raises(KeyError, match="split 'test'"):
        tfds_scenes.SampleSource(path, "test")


def test_other_encodings_round_trip(tmp_path):
    """npy normals, 16-bit depth, per-sample intrinsics: other feature types, still exact."""
    samples = [scenes.generate_scene(SEED, i, RES) for i in range(3)]
    folder.write_dataset(tmp_path / "d", samples, RES, intrinsics=None,
                         exts={"depth": "png", "normals": "npy"})
    path = tfds_scenes.build_from_folder(tmp_path / "d", tmp_path / "tfds")
    f, src = folder.AlignedFolder(tmp_path / "d"), tfds_scenes.SampleSource(path)
    for i in range(3):
        assert_same(f[i], src[i])
    assert np.array_equal(src[0]["normals"], samples[0]["normals"])  # npy normals are exact


def test_bad_samples_raise_or_are_skipped(scene_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(scene_folder, bad)
    (bad / "caption" / "000002.txt").write_bytes(b"\xc3\x28")
    with pytest.raises(folder.FolderError, match="sample '000002', modality 'caption'"):
        tfds_scenes.build_from_folder(bad, tmp_path / "tfds_a")
    path = tfds_scenes.build_from_folder(bad, tmp_path / "tfds_b", skip_bad=True)
    src, good = tfds_scenes.SampleSource(path), folder.AlignedFolder(scene_folder)
    assert [src.stem(i) for i in range(len(src))] == ["000000", "000001", "000003", "000004"]
    for i, stem in enumerate(["000000", "000001", "000003", "000004"]):
        assert_same(src[i], good[good.stems.index(stem)])
