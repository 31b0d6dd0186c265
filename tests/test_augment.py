"""Multi-modal augmentation: every field follows the same crop and flip (flip twice = identity,
normals' x negated, boxes = the objects' pixels), deterministic in (seed, index), and applied by
pre-tokenization when the config asks for it."""

import numpy as np
import pytest

from fourm.data import augment as A
from fourm.data.scenes import generate_scene

RES = 32


@pytest.fixture(scope="module")
def scene():
    s = generate_scene(0, 3, RES)
    assert len(s["boxes"]) >= 2
    return s


def _tight_box(mask):
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


FLIP = A.Params(0.0, 0.0, float(RES), float(RES), True)


def test_flip_twice_is_identity_for_every_field(scene):
    once = A.apply(scene, FLIP, (RES, RES))
    assert not np.array_equal(once["rgb"], scene["rgb"])
    _assert_same(A.apply(once, FLIP, (RES, RES)), scene)


def test_flip_mirrors_pixels_and_negates_normals_x(scene):
    out = A.apply(scene, FLIP, (RES, RES))
    for k in ("rgb", "depth", "semseg", "instance"):
        assert np.array_equal(out[k], scene[k][:, ::-1]), k
    n, m = scene["normals"][:, ::-1], out["normals"]
    assert np.array_equal(m[..., 0], -n[..., 0]) and np.array_equal(m[..., 1:], n[..., 1:])
    # A surface facing right (+x, camera frame, OpenCV axes) faces left in the mirror image.
    right = scene["normals"][..., 0] > 0.3
    assert right.any() and (out["normals"][..., 0][right[:, ::-1]] < -0.3).all()
    assert out["intrinsics"]["cx"] == RES - 1 - scene["intrinsics"]["cx"]
    assert out["intrinsics"]["fx"] == scene["intrinsics"]["fx"]
    assert ("left" in scene["caption"]) == ("right" in out["caption"])


def test_boxes_follow_the_objects_under_flip_and_crop(scene):
    flipped = A.apply(scene, FLIP, (RES, RES))
    for b in flipped["boxes"]:  # exact: a flip moves whole pixels
        assert b["box"] == _tight_box(flipped["instance"] == b["instance"])
    aug = A.Augment(seed=1, hflip=0.5, crop=(0.6, 0.8))
    checked = 0
    for index in range(12):
        out = aug(scene, index)
        p = aug.params(index, (RES, RES))
        assert out["rgb"].shape == scene["rgb"].shape and out["rgb"].dtype == np.uint8
        assert set(np.unique(out["semseg"])) <= set(np.unique(scene["semseg"]))  # nearest: no blends
        assert set(np.unique(out["depth"])) <= set(np.unique(scene["depth"]))
        norms = np.linalg.norm(out["normals"], axis=-1)
        assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)
        for b in out["boxes"]:
            mask = out["instance"] == b["instance"]
            if mask.sum() < 4:
                continue
            tight = np.array(_tight_box(mask), float)
            # Nearest resampling puts each object edge within one output pixel of the moved box.
            assert np.abs(tight - np.array(b["box"])).max() <= 1.0 + 1e-9, (index, p, b, tight)
            checked += 1
        kept = {b["instance"] for b in out["boxes"]}
        assert kept >= set(np.unique(out["instance"])) - {0}  # every visible object keeps its box
    assert checked >= 5


def test_crop_moves_intrinsics_with_the_pixels():
    p = A.Params(4.0, 6.0, 16.0, 16.0, False)
    intr = {"fx": 30.0, "fy": 30.0, "cx": 15.5, "cy": 15.5}
    out = A._intrinsics(intr, p, (RES, RES))
    assert out["fx"] == 60.0 and out["fy"] == 60.0
    # The input coordinate x maps to output pixel (x - x0 + 0.5) * scale - 0.5: so does cx.
    assert out["cx"] == (15.5 - 4.0 + 0.5) * 2 - 0.5 and out["cy"] == (15.5 - 6.0 + 0.5) * 2 - 0.5
    # Resampling agrees: output pixel i of a coordinate ramp reads the input coordinate it shows.
    ramp = np.broadcast_to(np.arange(RES, dtype=np.float64), (RES, RES))
    got = A.resample(ramp, p, (RES, RES), "linear")[0]
    want = np.clip(p.x0 + (np.arange(RES) + 0.5) * p.cw / RES - 0.5, 0, RES - 1)
    assert np.allclose(got, want)


def test_deterministic_in_seed_and_index(scene):
    aug = A.Augment(seed=5, hflip=0.5, crop=(0.5, 1.0))
    _assert_same(aug(scene, 7), aug(scene, 7))
    draws = {aug.params(i, (RES, RES)) for i in range(20)}
    assert len(draws) == 20 and {d.flip for d in draws} == {True, False}
    assert A.Augment(seed=6, hflip=0.5, crop=(0.5, 1.0)).params(7, (RES, RES)) != aug.params(7, (RES, RES))
    ident = A.Augment(seed=5)  # the defaults change nothing
    _assert_same(ident(scene, 7), scene)


def test_bad_settings():
    with pytest.raises(ValueError, match="augment.crop"):
        A.Augment(crop=(0.0, 1.0))
    with pytest.raises(ValueError, match="augment.hflip"):
        A.Augment(hflip=2.0)
    assert A.Augment.from_config({"enabled": False, "hflip": 1.0}) is None


def test_pretokenize_applies_the_augmentation(tmp_path):
    from fourm.tokenizers import pretokenize as P
    from fourm.tokenizers.sources import SceneSource

    src = SceneSource(0, 0, 4, 64)
    aug = A.Augment(seed=2, hflip=1.0)
    man = P.pretokenize(src, tmp_path / "a", modalities=["rgb@64"], shard_size=4, batch_size=2,
                        progress=False, augment=aug)
    assert man["fingerprint"] != P.pretokenize(src, tmp_path / "b", modalities=["rgb@64"], shard_size=4,
                                               batch_size=2, progress=False)["fingerprint"]
    assert man["augment"]["hflip"] == 1.0
    recs, _ = P.open_shards(tmp_path / "a", decode=True)
    for i in range(4):
        assert np.array_equal(recs[i]["rgb@64"], src[i]["rgb"][:, ::-1])
