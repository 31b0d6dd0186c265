"""Procedural multimodal scenes: a room, 1-6 objects, a camera and a light, rendered to exactly
aligned RGB, depth, surface normals, semantic and instance segmentation, boxes, a caption and
metadata.

    sample = generate_scene(seed=0, index=12, resolution=64)

Determinism: the 3D scene depends only on (seed, index) (np.random.SeedSequence([seed, index])),
never on the resolution; everything else is a pure function of the scene and the resolution.
Objects that no pixel sees at a given resolution are left out of boxes, caption and counts.

Keys and conventions of a sample (shared with `fourm.data.folder` and the TFDS builders):
  rgb       uint8   [H, W, 3]  sRGB
  depth     float32 [H, W]     metres along the camera z axis (not the ray length); always > 0
  normals   float32 [H, W, 3]  outward unit normals in the camera frame, OpenCV axes:
                               x right, y down, z forward (surfaces facing the camera: n_z < 0)
  semseg    uint8   [H, W]     class id, index into CLASSES
  instance  int32   [H, W]     0 = floor / walls, 1..K = object (boxes[k - 1]["instance"] == k)
  boxes     list of dicts: class, class_id, box [x0, y0, x1, y1] (half-open pixel ranges:
            columns x0..x1-1, rows y0..y1-1), instance, colour, size, material, pixels, distance
  caption   str
  metadata  dict of numbers (see `scene_metadata`)
  intrinsics {fx, fy, cx, cy} pixels; pixel (u, v) has its centre at (u, v), so a pixel with
            depth z back-projects to ((u - cx) z / fx, (v - cy) z / fy, z).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from fourm.data import captions as captions_lib
from fourm.data import folder as folder_lib
from fourm.data import render as render_lib

# The registry fields every generated scene carries (plus its "intrinsics").
FIELDS = ("rgb", "depth", "normals", "semseg", "instance", "boxes", "caption", "metadata")
CLASSES = ["background", "floor", "wall", "sphere", "cube", "cylinder", "cone"]
NUM_CLASSES = len(CLASSES)
SHAPES = ["sphere", "cube", "cylinder", "cone"]
# Colour names and their sRGB values (0-255). Objects use COLOURS; rooms the other two tables.
COLOUR_RGB = {"red": (200, 30, 30), "orange": (235, 125, 25), "yellow": (235, 205, 40),
              "green": (40, 160, 60), "cyan": (35, 180, 190), "blue": (40, 70, 210),
              "purple": (130, 50, 175), "pink": (235, 120, 170)}
COLOURS = list(COLOUR_RGB)
FLOOR_RGB = {"grey": (128, 128, 128), "dark grey": (75, 75, 78), "beige": (190, 170, 135),
             "brown": (120, 85, 55)}
WALL_RGB = {"white": (225, 225, 222), "cream": (230, 215, 175), "light blue": (165, 190, 220),
            "pale green": (175, 205, 170)}
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.44}  # base radius in metres
MATERIALS = {"matte": (0.0, 1.0), "shiny": (0.55, 60.0)}  # specular weight, Blinn-Phong exponent
BACKGROUND, FLOOR, WALL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    fov_deg: float = 55.0
    min_objects: int = 1
    max_objects: int = 6
    shadows: bool = True


@dataclasses.dataclass(frozen=True)
class Scene:
    """A sampled 3D scene: the renderer's view plus the names the caption needs."""

    view: render_lib.View
    objects: tuple[dict, ...]  # per object: shape, colour, size, material (same order as view)
    floor_colour: str
    wall_colour: str
    camera: dict  # height, pitch_deg, yaw_deg
    light: dict  # azimuth_deg, elevation_deg


def _linear(rgb255) -> tuple[float, float, float]:
    return tuple(float((c / 255.0) ** 2.2) for c in rgb255)


def _choice(rng, items):
    return items[int(rng.integers(len(items)))]


def sample_scene(seed: int, index: int, config: SceneConfig = SceneConfig()) -> Scene:
    """The 3D scene for (seed, index): independent of resolution."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    height = rng.uniform(1.0, 2.2)
    pitch, yaw = math.radians(rng.uniform(20, 40)), math.radians(rng.uniform(-20, 20))
    cam_pos = np.array([0.0, height, 0.0])
    rot = render_lib.look_rotation(yaw, pitch)
    tan_half = math.tan(math.radians(config.fov_deg) / 2)

    placed: list[render_lib.Obj] = []
    names: list[dict] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        shape, colour = _choice(rng, SHAPES), _choice(rng, COLOURS)
        size, material = _choice(rng, list(SIZES)), _choice(rng, list(MATERIALS))
        r = SIZES[size] * rng.uniform(0.9, 1.1)
        dims = {"sphere": (r, 2 * r), "cube": (0.8 * r, 1.6 * r),
                "cylinder": (0.8 * r, 2 * r * rng.uniform(0.8, 1.3)),
                "cone": (r, 2.2 * r * rng.uniform(0.9, 1.2))}[shape]
        spec, shin = MATERIALS[material]
        obj_yaw = rng.uniform(0, math.pi / 2) if shape == "cube" else 0.0
        # Aim the object at a random spot in the lower three quarters of the image and put it where
        # that pixel's ray meets the floor, so objects are in view by construction.
        for _attempt in range(30):
            xn, yn = rng.uniform(-0.75, 0.75), rng.uniform(-0.35, 0.8)
            d = rot @ np.array([xn * tan_half, yn * tan_half, 1.0])
            if d[1] >= -1e-3:
                continue
            t = -height / d[1]
            gx, gz = cam_pos[0] + t * d[0], cam_pos[2] + t * d[2]
            if not 1.8 <= math.hypot(gx, gz) <= 8.0:
                continue
            cand = render_lib.Obj(shape, gx, gz, dims[0], dims[1], obj_yaw, _linear(COLOUR_RGB[colour]),
                                  spec, shin)
            if _fits(cand, placed, cam_pos, rot, tan_half):
                placed.append(cand)
                names.append({"shape": shape, "colour": colour, "size": size, "material": material})
                break

    if placed:
        xs = [(o.x - o.footprint, o.x + o.footprint, o.z + o.footprint) for o in placed]
        xmin, xmax, zmax = min(x[0] for x in xs), max(x[1] for x in xs), max(x[2] for x in xs)
    else:
        xmin, xmax, zmax = 0.0, 0.0, 3.0
    back_z = zmax + rng.uniform(0.4, 2.5)
    wall_xmin = min(xmin, -1.0) - rng.uniform(0.4, 3.0)
    wall_xmax = max(xmax, 1.0) + rng.uniform(0.4, 3.0)
    floor_colour, wall_colour = _choice(rng, list(FLOOR_RGB)), _choice(rng, list(WALL_RGB))
    # Light from the camera's side of the room (the walls would block light from behind them).
    az, el = math.radians(rng.uniform(100, 260)), math.radians(rng.uniform(30, 70))
    light = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    view = render_lib.View(
        cam_pos=cam_pos, cam_rot=rot, fov_deg=config.fov_deg, back_z=back_z, wall_xmin=wall_xmin,
        wall_xmax=wall_xmax, floor_albedo=_linear(FLOOR_RGB[floor_colour]),
        wall_albedo=_linear(WALL_RGB[wall_colour]), light_dir=light,
        light_intensity=rng.uniform(0.75, 1.0), ambient=rng.uniform(0.18, 0.35),
        objects=tuple(placed), shadows=config.shadows)
    return Scene(view, tuple(names), floor_colour, wall_colour,
                 camera={"height": height, "pitch_deg": math.degrees(pitch), "yaw_deg": math.degrees(yaw)},
                 light={"azimuth_deg": math.degrees(az), "elevation_deg": math.degrees(el)})


def _fits(cand, placed, cam_pos, rot, tan_half) -> bool:
    """Objects keep 0.15 m apart on the floor and none may hide most of another (checked on the
    bounding spheres in normalised image coordinates, so it does not depend on resolution)."""
    for o in placed:
        if math.hypot(cand.x - o.x, cand.z - o.z) < cand.footprint + o.footprint + 0.15:
            return False

    def disc(o):
        centre = np.array([o.x, o.height / 2, o.z])
        pc = rot.T @ (centre - cam_pos)
        rad = math.hypot(o.footprint, o.height / 2)
        return pc[0] / pc[2] / tan_half, pc[1] / pc[2] / tan_half, rad / pc[2] / tan_half, pc[2]

    cu, cv, cr, cz = disc(cand)
    if abs(cu) > 0.95 or cv > 0.95 or cv < -0.9:
        return False
    for o in placed:
        ou, ov, orad, oz = disc(o)
        front, back = (cr, orad) if cz < oz else (orad, cr)
        if math.hypot(cu - ou, cv - ov) < 0.6 * front + 0.3 * back:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Scene -> sample
# ---------------------------------------------------------------------------------------------
def render_scene(scene: Scene, resolution: int) -> dict:
    """Render a scene and derive all modalities. Also returns the internal `surface` map (a
    distinct id per smooth surface piece; used by the geometry tests, not written to disk)."""
    out = render_lib.render(scene.view, resolution)
    ids = out["ids"]
    semseg = np.full(ids.shape, WALL, np.uint8)
    semseg[ids == render_lib.FLOOR] = FLOOR
    obj_index = ids - render_lib.OBJECT_BASE  # >= 0 on objects
    counts = np.bincount(obj_index[obj_index >= 0], minlength=len(scene.objects))
    instance = np.zeros(ids.shape, np.int32)
    boxes, visible = [], []
    for k, (obj, names) in enumerate(zip(scene.view.objects, scene.objects)):
        mask = obj_index == k
        semseg[mask] = CLASSES.index(obj.shape)
        if counts[k] == 0:
            continue
        inst = len(boxes) + 1  # consecutive ids over the visible objects
        instance[mask] = inst
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        pc = scene.view.cam_rot.T @ (np.array([obj.x, obj.height / 2, obj.z]) - scene.view.cam_pos)
        boxes.append({"class": obj.shape, "class_id": CLASSES.index(obj.shape),
                      "box": [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1],
                      "instance": inst, "colour": names["colour"], "size": names["size"],
                      "material": names["material"], "pixels": int(counts[k]),
                      "distance": round(float(pc[2]), 4)})
        visible.append({**names, "x_cam": float(pc[0]), "z_cam": float(pc[2]), "index": k})
    return {"rgb": out["rgb"], "depth": out["depth"], "normals": out["normals"], "semseg": semseg,
            "instance": instance, "boxes": boxes, "visible": visible, "surface": out["surface"],
            "intrinsics": out["intrinsics"]}


def scene_metadata(scene: Scene, rgb: np.ndarray, depth: np.ndarray, semseg: np.ndarray,
                   object_count: int) -> dict:
    """Scalar descriptors of a rendered scene (rounded to 5 decimals for readable JSON)."""
    img = rgb.astype(np.float64)
    luma = (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]) / 255.0
    # Colourfulness of Hasler & Suesstrunk (2003), on the 0-255 scale of the paper.
    rg, yb = img[..., 0] - img[..., 1], 0.5 * (img[..., 0] + img[..., 1]) - img[..., 2]
    colourfulness = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    n = semseg.size
    fields = {
        "object_count": int(object_count),
        "brightness": float(luma.mean()), "contrast": float(luma.std()),
        "colourfulness": float(colourfulness),
        "depth_min": float(depth.min()), "depth_max": float(depth.max()), "depth_mean": float(depth.mean()),
        "floor_fraction": float(np.count_nonzero(semseg == FLOOR) / n),
        "wall_fraction": float(np.count_nonzero(semseg == WALL) / n),
        "object_fraction": float(np.count_nonzero(semseg > WALL) / n),
        "camera_height": scene.camera["height"], "camera_pitch": scene.camera["pitch_deg"],
        "camera_yaw": scene.camera["yaw_deg"], "fov": scene.view.fov_deg,
        "light_azimuth": scene.light["azimuth_deg"], "light_elevation": scene.light["elevation_deg"],
    }
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in fields.items()}


def generate_scene(seed: int, index: int, resolution: int = 64, config: SceneConfig = SceneConfig()) -> dict:
    """One sample (see the module docstring for keys, dtypes and conventions)."""
    scene = sample_scene(seed, index, config)
    r = render_scene(scene, resolution)
    # Captions draw from their own stream, so caption wording never shifts the scene layout.
    cap_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    caption = captions_lib.make_caption(r["visible"], scene.floor_colour, scene.wall_colour, cap_rng)
    return {
        "rgb": r["rgb"], "depth": r["depth"], "normals": r["normals"], "semseg": r["semseg"],
        "instance": r["instance"], "boxes": r["boxes"], "caption": caption,
        "metadata": scene_metadata(scene, r["rgb"], r["depth"], r["semseg"], len(r["boxes"])),
        "intrinsics": dict(r["intrinsics"]),
    }


def _generate_one(index, seed, resolution, config):
    return generate_scene(seed, index, resolution, config)


def parallel_map(fn, items, workers: int, total: int | None = None, desc: str = "scenes",
                 progress: bool = True) -> Iterator:
    """`map(fn, items)` in order, over `workers` spawned processes (spawn, not fork: forking a
    process that has started JAX's threads is unsafe), with a tqdm progress bar."""
    from tqdm.auto import tqdm

    items = list(items)
    total = len(items) if total is None else total
    bar = tqdm(total=total, desc=desc, unit="scene", disable=not progress, smoothing=0.1)
    try:
        if workers <= 1 or len(items) <= 1:
            for it in items:
                yield fn(it)
                bar.update(1)
            return
        chunk = max(1, min(16, len(items) // (4 * workers)))
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(items))) as pool:
            for result in pool.imap(fn, items, chunksize=chunk):
                yield result
                bar.update(1)
    finally:
        bar.close()


def generate_scenes(seed: int, start: int, num: int, resolution: int = 64, workers: int = 1,
                    config: SceneConfig = SceneConfig(), progress: bool = True) -> Iterator[dict]:
    """Samples start..start+num-1 in order; identical for any number of workers. With
    workers > 1 the workers are spawned, so a script calling this at top level needs the usual
    `if __name__ == "__main__":` guard."""
    fn = functools.partial(_generate_one, seed=seed, resolution=resolution, config=config)
    return parallel_map(fn, range(start, start + num), workers, desc=f"scenes@{resolution}",
                        progress=progress)


def _generate_and_write(index, seed, resolution, config, root, width, exts, depth_scale):
    sample = generate_scene(seed, index, resolution, config)
    folder_lib.write_sample(root, folder_lib.stem_for(index, width), sample, exts=exts,
                            depth_scale=depth_scale)
    return len(sample["boxes"])


def export_scenes(root: str | os.PathLike, seed: int, start: int, num: int, resolution: int = 64,
                  workers: int = 1, config: SceneConfig = SceneConfig(), depth_format: str = "npy",
                  depth_scale: float = folder_lib.DEFAULT_DEPTH_SCALE, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Generate scenes start..start+num-1 into an aligned folder (workers generate and write; the
    stems are the zero-padded scene indices). Returns the path of dataset.json."""
    root = Path(root)
    _prepare_output(root, overwrite)
    exts = folder_lib.default_exts(FIELDS)
    exts["depth"] = {"npy": "npy", "png16": "png"}[depth_format]
    width = max(6, len(str(start + num - 1)))
    fn = functools.partial(_generate_and_write, seed=seed, resolution=resolution, config=config,
                           root=str(root),
                           width=width, exts=exts, depth_scale=depth_scale)
    counts = list(parallel_map(fn, range(start, start + num), workers, desc=f"scenes@{resolution}",
                               progress=progress))
    intr = render_lib.intrinsics(config.fov_deg, resolution, resolution)
    return folder_lib.write_dataset_json(
        root, modalities=exts, resolution=(resolution, resolution), intrinsics=intr, num_samples=num,
        classes=CLASSES, depth_scale=depth_scale,
        source={"generator": "fourm.data.scenes", "seed": seed, "start": start, "num": num,
                "config": dataclasses.asdict(config), "objects_visible": int(sum(counts))})


def _prepare_output(root: Path, overwrite: bool) -> None:
    """Refuse to mix a new export into a non-empty folder; with overwrite, clear only a folder
    this generator wrote before (never arbitrary user data)."""
    if not root.exists() or not any(root.iterdir()):
        return
    spec_path = root / "dataset.json"
    ours = False
    if spec_path.exists():
        try:
            ours = json.loads(spec_path.read_text()).get("source", {}).get("generator") == "fourm.data.scenes"
        except (OSError, ValueError):
            ours = False
    if not overwrite or not ours:
        raise FileExistsError(f"{root} is not empty" + ("; pass overwrite=True (--overwrite) to replace it"
                              if ours else " and was not written by fourm-scenes; choose an empty folder"))
    spec_path.unlink()
    for mod in FIELDS:
        if (root / mod).is_dir():
            shutil.rmtree(root / mod)
