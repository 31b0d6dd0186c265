"""Procedural scenes: API, determinism, exact geometry, captions, metadata, pictures."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from fourm.data import captions, render, scenes, visualize

SEED = 3
N_GEOMETRY = 12  # scenes checked by the geometry tests (64 px)


@pytest.fixture(scope="module")
def rendered():
    """(scene, render_scene output) pairs, shared by the geometry tests."""
    out = []
    for i in range(N_GEOMETRY):
        sc = scenes.sample_scene(SEED, i)
        out.append((sc, scenes.render_scene(sc, 64)))
    return out


def backproject(depth, intr):
    h, w = depth.shape
    u, v = np.arange(w)[None, :], np.arange(h)[:, None]
    z = depth.astype(np.float64)
    return np.stack([(u - intr["cx"]) * z / intr["fx"], (v - intr["cy"]) * z / intr["fy"], z], -1)


def to_world(scene, pts_cam):
    view = scene.view
    return pts_cam @ view.cam_rot.T + view.cam_pos


def test_public_constants():
    assert scenes.CLASSES[0] == "background" and scenes.NUM_CLASSES == len(scenes.CLASSES)
    assert set(scenes.SHAPES) <= set(scenes.CLASSES) and {"floor", "wall"} <= set(scenes.CLASSES)
    assert len(scenes.COLOURS) >= 6 and len(set(scenes.COLOURS)) == len(scenes.COLOURS)


@pytest.mark.parametrize("resolution", [64, 224])
def test_sample_keys_dtypes_and_ranges(resolution):
    s = scenes.generate_scene(SEED, 1, resolution)
    h = w = resolution
    assert s["rgb"].shape == (h, w, 3) and s["rgb"].dtype == np.uint8
    assert s["depth"].shape == (h, w) and s["depth"].dtype == np.float32
    assert np.isfinite(s["depth"]).all() and s["depth"].min() > 0
    assert s["normals"].shape == (h, w, 3) and s["normals"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(s["normals"], axis=-1), 1.0, atol=1e-5)
    assert s["semseg"].dtype == np.uint8 and s["semseg"].max() < scenes.NUM_CLASSES
    assert (s["semseg"] != scenes.BACKGROUND).all()  # closed room: every ray hits something
    assert s["instance"].dtype == np.int32
    assert sorted(np.unique(s["instance"][s["instance"] > 0])) == [b["instance"] for b in s["boxes"]]
    assert [b["instance"] for b in s["boxes"]] == list(range(1, len(s["boxes"]) + 1))
    for b in s["boxes"]:
        assert scenes.CLASSES[b["class_id"]] == b["class"] and b["colour"] in scenes.COLOURS
    assert isinstance(s["caption"], str) and 3 <= len(s["caption"].split()) < 40
    intr = s["intrinsics"]
    assert intr["cx"] == (w - 1) / 2 and intr["fx"] == pytest.approx(w / 2 / math.tan(math.radians(27.5)))
    md = s["metadata"]
    for key in ("object_count", "brightness", "contrast", "colourfulness", "depth_min", "depth_max",
                "depth_mean", "floor_fraction", "camera_height", "camera_pitch", "light_elevation"):
        assert isinstance(md[key], (int, float)), key
    assert md["object_count"] == len(s["boxes"])


def test_metadata_matches_images():
    s = scenes.generate_scene(SEED, 2, 64)
    md, d, seg = s["metadata"], s["depth"], s["semseg"]
    assert md["depth_min"] == pytest.approx(d.min(), abs=1e-5)
    assert md["depth_max"] == pytest.approx(d.max(), abs=1e-5)
    assert md["depth_mean"] == pytest.approx(d.mean(), abs=1e-5)
    assert md["floor_fraction"] == pytest.approx((seg == scenes.FLOOR).mean(), abs=1e-5)
    assert md["floor_fraction"] + md["wall_fraction"] + md["object_fraction"] == pytest.approx(1.0, abs=1e-4)
    luma = (0.299 * s["rgb"][..., 0] + 0.587 * s["rgb"][..., 1] + 0.114 * s["rgb"][..., 2]) / 255
    assert md["brightness"] == pytest.approx(luma.mean(), abs=1e-5)
    assert 0 < md["contrast"] < 0.5 and md["colourfulness"] > 0


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_deterministic_per_seed_and_index():
    _same(scenes.generate_scene(SEED, 7, 64), scenes.generate_scene(SEED, 7, 64))
    ref = scenes.generate_scene(SEED, 7, 64)["depth"]
    assert not np.array_equal(scenes.generate_scene(SEED, 8, 64)["depth"], ref)
    assert not np.array_equal(scenes.generate_scene(SEED + 1, 7, 64)["depth"], ref)
    # The 3D scene does not depend on resolution: the depth at the shared pixel centres of a
    # 63 px and a 21 px render (21 * 3 = 63, centres of every third pixel coincide) is the same.
    sc = scenes.sample_scene(SEED, 7)
    d63, d21 = render.render(sc.view, 63)["depth"], render.render(sc.view, 21)["depth"]
    np.testing.assert_allclose(d63[1::3, 1::3], d21, rtol=1e-5)


def test_parallel_equals_serial():
    serial = list(scenes.generate_scenes(SEED, 4, 5, 32, workers=1, progress=False))
    parallel = list(scenes.generate_scenes(SEED, 4, 5, 32, workers=2, progress=False))
    assert len(parallel) == 5
    for a, b in zip(serial, parallel):
        _same(a, b)
    _same(serial[2], scenes.generate_scene(SEED, 6, 32))


def test_normals_agree_with_depth_backprojection(rendered):
    """Normals recomputed from depth (back-projection with the intrinsics, central differences)
    match the rendered ones on pixels whose 3x3 neighbourhood is one smooth surface piece."""
    angles: dict[int, list] = {}
    for _, r in rendered:
        p = backproject(r["depth"], r["intrinsics"])
        n = np.cross(p[1:-1, 2:] - p[1:-1, :-2], p[2:, 1:-1] - p[:-2, 1:-1])
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        rn = r["normals"][1:-1, 1:-1].astype(np.float64)
        s = r["surface"]
        interior = np.ones(rn.shape[:2], bool)
        for dv in (-1, 0, 1):
            for du in (-1, 0, 1):
                interior &= s[1 + dv:s.shape[0] - 1 + dv, 1 + du:s.shape[1] - 1 + du] == s[1:-1, 1:-1]
        # x right, y down: (d/du) x (d/dv) points away from the camera; outward normals face it.
        ang = np.degrees(np.arccos(np.clip(-(n * rn).sum(-1), -1, 1)))
        for c in np.unique(r["semseg"]):
            angles.setdefault(int(c), []).append(ang[interior & (r["semseg"][1:-1, 1:-1] == c)])
    for c, vals in angles.items():
        vals = np.concatenate(vals)
        name = scenes.CLASSES[c]
        assert vals.size > 30, name
        assert np.median(vals) < 1.0, (name, np.median(vals))
        if name in ("floor", "wall", "cube"):  # planar: exact up to float32 depth rounding
            assert np.percentile(vals, 99) < 0.1, (name, np.percentile(vals, 99))
        else:
            assert np.percentile(vals, 95) < 5.0, (name, np.percentile(vals, 95))


def _sdf(obj: render.Obj, p):
    x, y, z = p[..., 0] - obj.x, p[..., 1], p[..., 2] - obj.z
    if obj.shape == "sphere":
        return np.sqrt(x * x + (y - obj.radius) ** 2 + z * z) - obj.radius
    if obj.shape == "cube":
        c, s = math.cos(obj.yaw), math.sin(obj.yaw)
        q = np.stack([c * x - s * z, y - obj.radius, s * x + c * z])
        return np.max(np.abs(q) - obj.radius, axis=0)
    rho = np.sqrt(x * x + z * z)
    if obj.shape == "cylinder":
        return np.maximum(np.maximum(rho - obj.radius, y - obj.height), -y)
    k = obj.radius / obj.height
    return np.maximum((rho - k * (obj.height - y)) / math.sqrt(1 + k * k), np.maximum(-y, y - obj.height))


def test_every_pixel_lies_on_the_surface_its_labels_name(rendered):
    """Depth + intrinsics + camera pose put each pixel on the analytic surface that its semseg
    and instance labels name, and inside no object: labels and depth agree everywhere,
    boundaries included (a label one pixel off would sit on the wrong surface)."""
    for sc, r in rendered:
        pw = to_world(sc, backproject(r["depth"], r["intrinsics"]))
        tol = 1e-6 + 2e-6 * r["depth"]
        seg, inst, view = r["semseg"], r["instance"], sc.view
        floor = seg == scenes.FLOOR
        assert (np.abs(pw[..., 1])[floor] < tol[floor]).all()
        wall = seg == scenes.WALL
        dwall = np.minimum.reduce([np.abs(pw[..., 2] - view.back_z), np.abs(pw[..., 0] - view.wall_xmin),
                                   np.abs(pw[..., 0] - view.wall_xmax)])
        assert (dwall[wall] < tol[wall]).all()
        objects_px = (seg > scenes.WALL)
        assert ((inst > 0) == objects_px).all()
        for k, vis in enumerate(r["visible"], start=1):
            obj = view.objects[vis["index"]]
            m = inst == k
            assert (seg[m] == scenes.CLASSES.index(obj.shape)).all()
            assert (np.abs(_sdf(obj, pw[m])) < 1e-4).all(), (obj.shape, np.abs(_sdf(obj, pw[m])).max())
        for obj in view.objects:
            assert (_sdf(obj, pw) > -1e-4).all()


def test_depth_jumps_at_object_boundaries(rendered):
    """Where the instance label changes between two objects, or an object and a wall, the two
    3D points are at least the layout's minimum gap apart (0.15 m between objects, 0.4 m to
    walls): segmentation boundaries are depth discontinuities. On a planar surface piece the
    depth of each pixel lies on its neighbour's tangent plane (continuous)."""
    for sc, r in rendered:
        p = backproject(r["depth"], r["intrinsics"])
        inst, seg, surf, n = r["instance"], r["semseg"], r["surface"], r["normals"].astype(np.float64)
        for a, b in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                     ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
            gap = np.linalg.norm(p[a] - p[b], axis=-1)
            change = (inst[a] != inst[b]) & (seg[a] != scenes.FLOOR) & (seg[b] != scenes.FLOOR)
            assert (gap[change] > 0.15 - 1e-4).all(), gap[change].min()
            flat = [scenes.FLOOR, scenes.WALL, scenes.CLASSES.index("cube")]
            planar = (surf[a] == surf[b]) & np.isin(seg[a], flat)
            ray_b = p[b] / p[b][..., 2:3]
            pred = (n[a] * p[a]).sum(-1) / (n[a] * ray_b).sum(-1)
            assert (np.abs(pred - p[b][..., 2])[planar] < 1e-4 * p[b][..., 2][planar]).all()


def test_boxes_equal_instance_mask_extent():
    for i in range(10):
        s = scenes.generate_scene(SEED, i, 48)
        for b in s["boxes"]:
            rows, cols = np.nonzero(s["instance"] == b["instance"])
            assert b["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert b["pixels"] == rows.size
            assert (s["semseg"][rows, cols] == b["class_id"]).all()


ROOM_COLOURS = sorted(list(scenes.FLOOR_RGB) + list(scenes.WALL_RGB), key=len, reverse=True)


def test_captions_true_and_varied():
    openings, lengths = set(), []
    for i in range(60):
        s = scenes.generate_scene(SEED, i, 32)
        cap = s["caption"].lower()
        lengths.append(len(cap.split()))
        openings.add(" ".join(cap.split()[:2]))
        text = cap
        for rc in ROOM_COLOURS:
            text = text.replace(rc + " floor", "").replace(rc + " wall", "")
        mentioned = {c for c in scenes.COLOURS if re.search(rf"\b{c}\b", text)}
        assert mentioned <= {b["colour"] for b in s["boxes"]}, (cap, s["boxes"])
        shapes = {b["class"] for b in s["boxes"]}
        for shape, words in captions.SYNONYMS.items():
            if any(re.search(rf"\b{w}s?\b", text) for w in words):
                assert shape in shapes, (cap, shapes)
        m = re.search(r"\b(two|three|four|five|six) objects\b", cap)
        if m:
            assert captions.NUMBERS.index(m.group(1)) == len(s["boxes"]), cap
    assert max(lengths) < 40
    assert len(openings) >= 12, openings


def test_relations_follow_camera_geometry():
    a = {"x_cam": -1.0, "z_cam": 4.0}
    assert captions.relation(a, {"x_cam": 0.5, "z_cam": 4.2}) == "left of"
    assert captions.relation(a, {"x_cam": -2.0, "z_cam": 4.0}) == "right of"
    assert captions.relation(a, {"x_cam": -0.9, "z_cam": 2.0}) == "behind"
    assert captions.relation(a, {"x_cam": -1.2, "z_cam": 6.0}) == "in front of"
    # In rendered scenes, "left of" means a smaller image column of the object centre.
    for i in range(20):
        sc = scenes.sample_scene(SEED, i)
        r = scenes.render_scene(sc, 32)
        v = r["visible"]
        for j in range(len(v) - 1):
            if captions.relation(v[j], v[j + 1]) == "left of":
                assert v[j]["x_cam"] / v[j]["z_cam"] < v[j + 1]["x_cam"] / v[j + 1]["z_cam"] + 0.5


def test_visualize_helpers(tmp_path):
    s = scenes.generate_scene(SEED, 0, 32)
    depth_pic = visualize.colorize_depth(s["depth"])
    assert depth_pic.shape == (32, 32, 3) and depth_pic.dtype == np.uint8
    near = np.unravel_index(s["depth"].argmin(), (32, 32))
    far = np.unravel_index(s["depth"].argmax(), (32, 32))
    assert depth_pic[near].astype(int).sum() > depth_pic[far].astype(int).sum()  # near is bright
    bad = s["depth"].copy()
    bad[0, 0] = np.nan
    assert (visualize.colorize_depth(bad)[0, 0] == 0).all()
    assert np.array_equal(visualize.colorize_semseg(np.array([[1, 2]])), visualize.PALETTE[[[1, 2]]])
    assert visualize.colorize_normals(s["normals"]).dtype == np.uint8
    pics, titles = visualize.sample_row(s, scale=2)
    assert titles == ["rgb", "depth", "normals", "semseg", "instance", "boxes"]
    grid = visualize.make_grid([pics, pics], captions=[s["caption"], "second"], col_titles=titles)
    assert grid.dtype == np.uint8 and grid.shape[1] == 4 + 6 * (128 + 4) and grid.shape[0] > 2 * 128
    out = tmp_path / "g.png"
    visualize.save_png(out, grid)
    assert np.array_equal(np.asarray(Image.open(out)), grid)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_benchmark_module_measures():
    from fourm.bench import scenes as bench

    assert bench.measure(16, 1, 3) > 0
