"""The aligned-folder format: exact round trips, every kind of bad input, and the CLI."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fourm.config import REPO_ROOT
from fourm.data import folder, scenes

SEED, NUM, RES = 5, 6, 32


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "clean"
    scenes.export_scenes(root, SEED, 0, NUM, RES, workers=1, progress=False)
    return root


@pytest.fixture()
def copy(clean, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(clean, dst)
    return dst


def assert_matches_generator(sample, index, res=RES, depth_atol=0.0):
    ref = scenes.generate_scene(SEED, index, res)
    assert list(sample) == list(ref)
    for k, v in ref.items():
        if k == "normals":  # 8-bit PNG: within half a quantisation step per channel, unit length
            assert sample[k].dtype == np.float32
            assert np.abs(sample[k] - v).max() < 1.5 / 127.5
            np.testing.assert_allclose(np.linalg.norm(sample[k], axis=-1), 1.0, atol=1e-5)
        elif k == "depth" and depth_atol:
            assert sample[k].dtype == np.float32 and np.abs(sample[k] - v).max() <= depth_atol
        elif isinstance(v, np.ndarray):
            assert sample[k].dtype == v.dtype and np.array_equal(sample[k], v), k
        else:
            assert sample[k] == v, k


def test_export_round_trip(clean):
    f = folder.AlignedFolder(clean)
    assert len(f) == NUM and f.stems == [f"{i:06d}" for i in range(NUM)]
    spec = json.loads((clean / "dataset.json").read_text())
    assert spec["resolution"] == [RES, RES] and spec["classes"] == scenes.CLASSES
    assert set(spec["modalities"]) == set(scenes.FIELDS) and spec["intrinsics"]["cx"] == (RES - 1) / 2
    assert "normals" in spec["conventions"] and spec["source"]["seed"] == SEED
    for i in range(NUM):
        assert_matches_generator(f[i], i)
    assert f.validate() == []


def test_png16_depth_and_per_sample_intrinsics(tmp_path):
    samples = [scenes.generate_scene(SEED, i, RES) for i in range(3)]
    folder.write_dataset(tmp_path / "d", samples, RES, intrinsics=None, exts={"depth": "png"},
                         classes=scenes.CLASSES)
    spec = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert spec["intrinsics"] is None and spec["modalities"]["depth"] == "png"
    meta0 = json.loads((tmp_path / "d" / "metadata" / "000000.json").read_text())
    assert meta0["fx"] == samples[0]["intrinsics"]["fx"]
    f = folder.AlignedFolder(tmp_path / "d")
    for i in range(3):
        assert_matches_generator(f[i], i, depth_atol=0.0005 + 1e-6)  # millimetre PNG


def test_skip_bad_scans_and_keeps_alignment(copy):
    _corrupt_depth_nan(copy)
    f = folder.AlignedFolder(copy, skip_bad=True, report_path=copy / "skipped.json")
    f = pickle.loads(pickle.dumps(f))  # e.g. sent to grain worker processes
    assert f.skipped[0].sample == "000003" and f.skipped[0].modality == "depth"
    assert f.stems == [s for s in (f"{i:06d}" for i in range(NUM)) if s != "000003"]
    for i, stem in enumerate(f.stems):
        assert_matches_generator(f[i], int(stem))
    report = json.loads((copy / "skipped.json").read_text())
    assert report["skipped"] == 1 and report["kept"] == NUM - 1
    assert report["samples"][0]["sample"] == "000003" and report["samples"][0]["modality"] == "depth"


# ----------------------------------------------------------------------------------------------
# Bad input: each case corrupts one sample; default raises naming sample + modality, skip_bad
# drops exactly that sample.
# ----------------------------------------------------------------------------------------------
def _corrupt_missing(root):
    (root / "depth" / "000001.npy").unlink()
    return "000001", "depth", "missing file"


def _corrupt_one_modality_only(root):
    shutil.copy(root / "rgb" / "000000.png", root / "rgb" / "extra.png")
    return "extra", None, "present only in modality 'rgb'"


def _corrupt_wrong_extension(root):
    (root / "depth" / "000002.npy").rename(root / "depth" / "000002.png")
    return "000002", "depth", "dataset.json says depth is .npy"


def _corrupt_wrong_size(root):
    Image.new("RGB", (RES, RES // 2)).save(root / "rgb" / "000002.png")
    return "000002", "rgb", "wrong size"


def _corrupt_wrong_channels(root):
    Image.new("RGBA", (RES, RES)).save(root / "rgb" / "000004.png")
    return "000004", "rgb", "got mode 'RGBA'"


def _corrupt_wrong_dtype(root):
    np.save(root / "depth" / "000001.npy", np.ones((RES, RES), np.float64))
    return "000001", "depth", "wrong dtype"


def _corrupt_wrong_shape(root):
    np.save(root / "depth" / "000001.npy", np.ones((RES, RES, 1), np.float32))
    return "000001", "depth", "wrong shape"


def _corrupt_unreadable_image(root):
    (root / "semseg" / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return "000003", "semseg", "unreadable image"


def _corrupt_depth_nan(root):
    d = np.load(root / "depth" / "000003.npy")
    d[4, 5], d[6, 7] = np.nan, np.inf
    np.save(root / "depth" / "000003.npy", d)
    return "000003", "depth", "2 NaN/inf values"


def _corrupt_invalid_json(root):
    (root / "boxes" / "000004.json").write_text('[{"class": "cube", "box": [1, 2')
    return "000004", "boxes", "invalid JSON"


def _corrupt_box_out_of_image(root):
    (root / "boxes" / "000004.json").write_text(json.dumps([{"class": "cube", "box": [0, 0, RES + 5, 3]}]))
    return "000004", "boxes", "not inside"


def _corrupt_non_utf8(root):
    (root / "caption" / "000005.txt").write_bytes("A red cube ".encode() + b"\xff\xfe")
    return "000005", "caption", "not valid UTF-8"


def _corrupt_metadata_not_object(root):
    (root / "metadata" / "000000.json").write_text("[1, 2]")
    return "000000", "metadata", "expected a JSON object"


def _corrupt_semseg_class(root):
    seg = np.asarray(Image.open(root / "semseg" / "000002.png")).copy()
    seg[0, 0] = 200
    Image.fromarray(seg).save(root / "semseg" / "000002.png")
    return "000002", "semseg", "class id 200"


CASES = [_corrupt_missing, _corrupt_one_modality_only, _corrupt_wrong_extension, _corrupt_wrong_size,
         _corrupt_wrong_channels, _corrupt_wrong_dtype, _corrupt_wrong_shape, _corrupt_unreadable_image,
         _corrupt_depth_nan, _corrupt_invalid_json, _corrupt_box_out_of_image, _corrupt_non_utf8,
         _corrupt_metadata_not_object, _corrupt_semseg_class]


@pytest.mark.parametrize("corrupt", CASES, ids=[c.__name__[9:] for c in CASES])
def test_bad_input(copy, corrupt):
    stem, modality, words = corrupt(copy)
    with pytest.raises(folder.FolderError) as info:
        f = folder.AlignedFolder(copy)  # structural problems raise here ...
        for i in range(len(f)):  # ... content problems when the sample is read
            f[i]
    err = info.value
    assert err.sample == stem and f"sample {stem!r}" in str(err)
    if modality:
        assert err.modality == modality and f"modality {modality!r}" in str(err)
    assert words in str(err), str(err)
    # validate() finds the same problem without reading sample by sample.
    if modality and corrupt not in (_corrupt_missing, _corrupt_wrong_extension):
        errors = folder.AlignedFolder(copy).validate(raise_errors=False)
        assert [(e.sample, e.modality) for e in errors] == [(stem, modality)]
    # skip_bad: exactly that sample is dropped, the others are intact and aligned.
    f = folder.AlignedFolder(copy, skip_bad=True)
    assert [e.sample for e in f.skipped] == [stem]
    expected = [s for s in (f"{i:06d}" for i in range(NUM)) if s != stem]
    assert f.stems == expected
    for i, s in enumerate(f.stems):
        assert_matches_generator(f[i], int(s))


def test_bad_dataset_json(copy):
    (copy / "dataset.json").write_text("{oops")
    with pytest.raises(folder.FolderError, match="dataset.json.*invalid JSON"):
        folder.AlignedFolder(copy, skip_bad=True)
    (copy / "dataset.json").write_text(json.dumps({"modalities": {"rgb": "png"}, "resolution": [RES]}))
    with pytest.raises(folder.FolderError, match="resolution"):
        folder.AlignedFolder(copy)
    (copy / "dataset.json").unlink()
    with pytest.raises(folder.FolderError, match="missing dataset.json"):
        folder.AlignedFolder(copy)


def test_sample_missing_in_every_modality(copy):
    for mod in scenes.FIELDS:
        next((copy / mod).glob("000004.*")).unlink()
    with pytest.raises(folder.FolderError, match="num_samples=6 but .* 5 distinct stems"):
        folder.AlignedFolder(copy)
    with pytest.warns(UserWarning, match="num_samples"):
        assert len(folder.AlignedFolder(copy, skip_bad=True)) == 5


def test_export_refuses_foreign_folders(tmp_path, clean):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        scenes.export_scenes(tmp_path / "mine", SEED, 0, 1, RES, overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").exists()
    with pytest.raises(FileExistsError):  # our own folder, without overwrite
        scenes.export_scenes(clean, SEED, 0, 1, RES, progress=False)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fourm.cli.scenes", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_generate_show_validate(tmp_path):
    r = _cli("--num", "3", "--resolution", "32", "--seed", str(SEED), "--out", "d", "--workers", "1",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    f = folder.AlignedFolder(tmp_path / "d")
    assert len(f) == 3
    assert_matches_generator(f[2], 2)
    np.save(tmp_path / "d" / "depth" / "000001.npy", np.full((32, 32), np.nan, np.float32))
    r = _cli("show", "d", "--num", "8", "--out", "grid.png", cwd=tmp_path)
    assert r.returncode != 0 and "sample '000001'" in r.stderr and "NaN" in r.stderr
    r = _cli("show", "d", "--num", "8", "--out", "grid.png", "--skip-bad", "--report", "bad.json",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[1] == 4 + 6 * (128 + 4) and grid.shape[0] > 2 * 128  # 2 good rows, 6 columns
    assert json.loads((tmp_path / "bad.json").read_text())["samples"][0]["sample"] == "000001"
    r = _cli("validate", "d", cwd=tmp_path)
    assert r.returncode == 1 and "1 bad" in r.stdout
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "--skip_bad" in r.stdout


def test_config_defaults_and_aliases():
    from fourm.config import load_config

    c = load_config(str(REPO_ROOT / "configs" / "scenes.py"), ["num=7", "show.num=2"])
    assert (c.num, c.show.num, c.resolution, c.out) == (7, 2, 64, "data/scenes_64")
    assert load_config("scenes:224").out == "data/scenes_224"


def test_write_dataset_intrinsics_default_to_the_first_sample(tmp_path):
    samples = [scenes.generate_scene(SEED, i, RES) for i in range(2)]
    odd = dict(samples[1], intrinsics={"fx": 10.0, "fy": 11.0, "cx": 3.0, "cy": 4.0})
    folder.write_dataset(tmp_path / "d", [samples[0], odd], RES)
    spec = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert spec["intrinsics"] == samples[0]["intrinsics"]
    assert "fx" not in json.loads((tmp_path / "d" / "metadata" / "000000.json").read_text())
    f = folder.AlignedFolder(tmp_path / "d")
    assert f[0]["intrinsics"] == samples[0]["intrinsics"] and f[1]["intrinsics"] == odd["intrinsics"]
    assert f[1]["metadata"] == samples[1]["metadata"]


def test_viewer_show_python_api(clean, tmp_path):
    from fourm.data.viewer import show

    out = show(clean, num=2, out=tmp_path / "v.png")
    grid = np.asarray(Image.open(out))
    assert grid.shape[1] == 4 + 6 * (128 + 4) and grid.shape[0] > 2 * 128
