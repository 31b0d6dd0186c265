"""Vectorised numpy ray casting of procedural scenes against analytic primitives.

One ray per pixel, through the pixel centre, so every rendered modality is exactly aligned: the
same intersection gives the colour, depth, normal, class and instance of a pixel (no
anti-aliasing, on purpose: a blended boundary pixel would belong to two labels at once).

Conventions (shared with `fourm.data.scenes` and the aligned-folder format):
* World: right-handed, y up, the floor is the plane y = 0.
* Camera frame: OpenCV, x right, y down, z forward. Pixel (u, v) (column, row) has its centre at
  image coordinates (u, v); its ray is d = R @ ((u - cx) / fx, (v - cy) / fy, 1) with R the
  camera-to-world rotation. Because d has camera z = 1, the ray parameter t of a hit is its depth
  (camera z in metres), not the Euclidean ray length.
* Normals are outward unit vectors in the camera frame, so surfaces facing the camera have n_z < 0.

Arrays are kept as separate x/y/z planes (structure of arrays): each numpy call then runs over one
contiguous array, which is what makes ~4k-pixel frames cheap.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

INF = np.inf
# Primary ids in the id buffer: 0..3 are the room planes, objects start at OBJECT_BASE.
FLOOR, BACK_WALL, WALL_XMIN, WALL_XMAX = 0, 1, 2, 3
OBJECT_BASE = 4
_PLANE_NORMALS = np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0], [-1, 0, 0]], np.float64)
_SHADOW_EPS = 1e-4  # metres, shadow-ray start offset along the normal (avoids self-hits)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object standing on the floor. `radius` is the sphere radius, the cube half-side or the
    base radius of a cylinder / cone; `height` is the vertical extent; `yaw` rotates cubes."""

    shape: str
    x: float
    z: float
    radius: float
    height: float
    yaw: float
    albedo: tuple[float, float, float]  # linear RGB
    specular: float  # 0 for matte materials
    shininess: float

    @property
    def footprint(self) -> float:
        """Radius of the circle the object covers on the floor."""
        return self.radius * math.sqrt(2.0) if self.shape == "cube" else self.radius

    def aabb_corners(self) -> np.ndarray:
        f = self.footprint
        xs, ys, zs = (self.x - f, self.x + f), (0.0, self.height), (self.z - f, self.z + f)
        return np.array([[a, b, c] for a in xs for b in ys for c in zs], np.float64)


@dataclasses.dataclass(frozen=True)
class View:
    """Everything the renderer needs: camera pose, room, light and objects."""

    cam_pos: np.ndarray  # (3,) world
    cam_rot: np.ndarray  # (3, 3) camera-to-world, columns = camera x, y, z axes in world
    fov_deg: float  # horizontal = vertical field of view (square pixels, square images)
    back_z: float  # back wall plane z = back_z (normal -z)
    wall_xmin: float  # side wall x = wall_xmin (normal +x)
    wall_xmax: float  # side wall x = wall_xmax (normal -x)
    floor_albedo: tuple[float, float, float]
    wall_albedo: tuple[float, float, float]
    light_dir: np.ndarray  # (3,) unit vector pointing towards the light
    light_intensity: float
    ambient: float
    objects: tuple[Obj, ...]
    shadows: bool = True
    floor_tile: float = 0.5  # checker tile side in metres (a texture cue for depth from RGB)


def intrinsics(fov_deg: float, height: int, width: int) -> dict[str, float]:
    """Pinhole intrinsics in pixels for the pixel-centre-at-integer convention."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return {"fx": f, "fy": f, "cx": (width - 1) / 2.0, "cy": (height - 1) / 2.0}


def _cross(a, b) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross costs ~20 us of overhead per call)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def look_rotation(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation for a camera turned by `yaw` about world y and tilted down by
    `pitch` (radians). Columns: right, down, forward."""
    fwd = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right = _cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = _cross(fwd, right)
    return np.stack([right, down, fwd], axis=1)


# ---------------------------------------------------------------------------------------------
# Ray / primitive intersections. o and d are (x, y, z) tuples of arrays or scalars that
# broadcast; each returns t (inf where missed) for hits with t > tmin.
# ---------------------------------------------------------------------------------------------
def _sphere(obj, o, d, tmin):
    r = obj.radius
    px, py, pz = o[0] - obj.x, o[1] - r, o[2] - obj.z
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = px * d[0] + py * d[1] + pz * d[2]
    c = px * px + py * py + pz * pz - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > tmin), t, INF)


def _to_cube_local(obj, o, d):
    """World -> cube frame (centre at origin, axes along the cube edges)."""
    cs, sn = math.cos(obj.yaw), math.sin(obj.yaw)
    px, py, pz = o[0] - obj.x, o[1] - obj.radius, o[2] - obj.z
    lo = (cs * px - sn * pz, py, sn * px + cs * pz)
    ld = (cs * d[0] - sn * d[2], d[1], sn * d[0] + cs * d[2])
    return lo, ld


def _cube(obj, o, d, tmin):
    h = obj.radius
    lo, ld = _to_cube_local(obj, o, d)
    tnear, tfar = -INF, INF
    for oi, di in zip(lo, ld):
        # A zero direction component would give 0/0 on a slab face; nudge it (the ray is parallel
        # to that slab, and a 1e-300 component changes nothing measurable).
        di = np.where(di == 0, 1e-300, di)
        t1, t2 = (-h - oi) / di, (h - oi) / di
        tnear = np.maximum(tnear, np.minimum(t1, t2))
        tfar = np.minimum(tfar, np.maximum(t1, t2))
    return np.where((tnear <= tfar) & (tnear > tmin), tnear, INF)


def _cylinder(obj, o, d, tmin):
    # Side surface and top cap; the bottom cap lies on the floor and is never visible from above
    # it (cameras and shadow-ray origins are all at y >= 0).
    r, hgt = obj.radius, obj.height
    px, pz = o[0] - obj.x, o[2] - obj.z
    a = d[0] * d[0] + d[2] * d[2]
    b = px * d[0] + pz * d[2]
    c = px * px + pz * pz - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        ys = o[1] + ts * d[1]
        side = np.where((disc >= 0) & (a > 0) & (ts > tmin) & (ys >= 0) & (ys <= hgt), ts, INF)
        tt = (hgt - o[1]) / d[1]
        qx, qz = px + tt * d[0], pz + tt * d[2]
        top = np.where((tt > tmin) & (qx * qx + qz * qz <= r * r), tt, INF)
    return np.minimum(side, top)


def _cone(obj, o, d, tmin):
    # Apex at height H above (x, z), base radius R on the floor: x'^2 + z'^2 = k^2 (H - y)^2.
    hgt, k2 = obj.height, (obj.radius / obj.height) ** 2
    px, pz, py = o[0] - obj.x, o[2] - obj.z, hgt - o[1]
    a = d[0] * d[0] + d[2] * d[2] - k2 * d[1] * d[1]
    b = px * d[0] + pz * d[2] + k2 * py * d[1]
    c = px * px + pz * pz - k2 * py * py
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        small = np.abs(a) < 1e-12  # ray parallel to a generator line: one root, -c / 2b
        safe_a = np.where(small, 1.0, a)
        roots = [np.where(small, -c / (2 * b), (-b - sq) / safe_a), np.where(small, INF, (-b + sq) / safe_a)]
        best = INF
        for t in roots:
            yp = py - t * d[1]  # depth below the apex; the surface exists for 0 <= yp <= H
            best = np.minimum(best, np.where((disc >= 0) & (t > tmin) & (yp >= 0) & (yp <= hgt), t, INF))
    return best


INTERSECT = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone}
PART_COUNT = 8  # surface ids per object in the internal `surface` map (cube faces: 6)


def _object_normals(obj, px, py, pz):
    """Outward world normals and a surface-part id at surface points (1-D arrays)."""
    if obj.shape == "sphere":
        n = np.stack([px - obj.x, py - obj.radius, pz - obj.z]) / obj.radius
        return n, np.zeros(px.shape, np.int32)
    if obj.shape == "cube":
        (lx, ly, lz), _ = _to_cube_local(obj, (px, py, pz), (0.0, 0.0, 0.0))
        loc = np.stack([lx, ly, lz])
        axis = np.argmax(np.abs(loc), axis=0)  # the face whose plane the point is on
        sign = np.sign(np.take_along_axis(loc, axis[None], 0)[0])
        nl = np.zeros_like(loc)
        np.put_along_axis(nl, axis[None], sign[None], 0)
        cs, sn = math.cos(obj.yaw), math.sin(obj.yaw)  # local -> world is the transpose
        n = np.stack([cs * nl[0] + sn * nl[2], nl[1], -sn * nl[0] + cs * nl[2]])
        return n, (2 * axis + (sign > 0)).astype(np.int32)
    qx, qz = px - obj.x, pz - obj.z
    rho = np.maximum(np.sqrt(qx * qx + qz * qz), 1e-12)
    if obj.shape == "cylinder":
        # Top cap if the point is nearer the cap plane than the side surface (only ambiguous on
        # the rim, where either normal is as right as the other).
        top = (obj.height - py) < (obj.radius - rho)
        n = np.where(top, [[0.0], [1.0], [0.0]], np.stack([qx / rho, np.zeros_like(qx), qz / rho]))
        return n, top.astype(np.int32)
    k = obj.radius / obj.height
    n = np.stack([qx / rho, np.full_like(qx, k), qz / rho]) / math.sqrt(1 + k * k)
    return n, np.zeros(px.shape, np.int32)


def _screen_rect(view, corners, intr, height, width):
    """Pixel rectangle [v0, v1) x [u0, u1) containing the projection of a convex point set."""
    pc = (corners - view.cam_pos) @ view.cam_rot  # world -> camera (R^T p as row vectors)
    if np.any(pc[:, 2] <= 1e-3):
        return 0, height, 0, width  # behind / at the camera: no cheap bound, test every pixel
    u = intr["fx"] * pc[:, 0] / pc[:, 2] + intr["cx"]
    v = intr["fy"] * pc[:, 1] / pc[:, 2] + intr["cy"]
    u0 = int(np.clip(math.floor(u.min()) - 1, 0, width))
    u1 = int(np.clip(math.ceil(u.max()) + 2, 0, width))
    v0 = int(np.clip(math.floor(v.min()) - 1, 0, height))
    v1 = int(np.clip(math.ceil(v.max()) + 2, 0, height))
    return v0, v1, u0, u1


def _srgb(linear):
    return np.clip(linear, 0.0, 1.0) ** (1 / 2.2)


def render(view: View, height: int, width: int | None = None) -> dict[str, np.ndarray]:
    """Render a view. Returns rgb uint8, depth float32, normals float32 (camera frame), `ids`
    int32 (0..3 room planes, OBJECT_BASE + k object k), `surface` int32 (a distinct id per smooth
    surface piece: plane, cube face, cylinder side/top) and the intrinsics used."""
    width = height if width is None else width
    intr = intrinsics(view.fov_deg, height, width)
    rot, (ox, oy, oz) = view.cam_rot, view.cam_pos
    cx_ = (np.arange(width) - intr["cx"]) / intr["fx"]
    cy_ = (np.arange(height) - intr["cy"]) / intr["fy"]
    # World ray directions (camera z component = 1, so t = depth).
    dirs = [rot[i, 0] * cx_[None, :] + rot[i, 1] * cy_[:, None] + rot[i, 2] for i in range(3)]
    dx, dy, dz = dirs

    # --- room planes (full frame) ---
    with np.errstate(divide="ignore", invalid="ignore"):
        tplanes = np.stack([
            np.where(dy < 0, -oy / dy, INF),
            np.where(dz > 0, (view.back_z - oz) / dz, INF),
            np.where(dx < 0, (view.wall_xmin - ox) / dx, INF),
            np.where(dx > 0, (view.wall_xmax - ox) / dx, INF),
        ])
    ids = np.argmin(tplanes, axis=0).astype(np.int32)
    depth = np.take_along_axis(tplanes, ids[None], 0)[0]

    # --- objects, each only inside its projected bounding rectangle ---
    rects = []
    for k, obj in enumerate(view.objects):
        v0, v1, u0, u1 = rect = _screen_rect(view, obj.aabb_corners(), intr, height, width)
        rects.append(rect)
        if v0 >= v1 or u0 >= u1:
            continue
        sub = (slice(v0, v1), slice(u0, u1))
        t = INTERSECT[obj.shape](obj, (ox, oy, oz), (dx[sub], dy[sub], dz[sub]), 1e-6)
        closer = t < depth[sub]
        depth[sub] = np.where(closer, t, depth[sub])
        ids[sub] = np.where(closer, OBJECT_BASE + k, ids[sub])

    px, py, pz = ox + depth * dx, oy + depth * dy, oz + depth * dz
    nw = _PLANE_NORMALS[np.minimum(ids, OBJECT_BASE - 1)].transpose(2, 0, 1).copy()  # (3, H, W)
    surface = np.where(ids < OBJECT_BASE, ids, 0).astype(np.int32)
    for k, obj in enumerate(view.objects):
        v0, v1, u0, u1 = rects[k]
        sel = np.nonzero(ids[v0:v1, u0:u1] == OBJECT_BASE + k)
        if sel[0].size == 0:
            continue
        rr, cc = sel[0] + v0, sel[1] + u0
        n, part = _object_normals(obj, px[rr, cc], py[rr, cc], pz[rr, cc])
        nw[:, rr, cc] = n
        surface[rr, cc] = OBJECT_BASE + k * PART_COUNT + part

    rgb = _shade(view, ids, (px, py, pz), nw, dirs)
    normals_cam = np.einsum("ji,jhw->hwi", rot, nw)  # R^T n, channels last
    return {
        "rgb": (np.round(_srgb(rgb) * 255)).astype(np.uint8),
        "depth": depth.astype(np.float32),
        "normals": normals_cam.astype(np.float32),
        "ids": ids,
        "surface": surface,
        "intrinsics": intr,
    }


def _shade(view, ids, p, nw, dirs):
    """Lambert + ambient + Blinn-Phong specular, with cast shadows from the objects."""
    light = view.light_dir
    albedo_lut = np.array([view.floor_albedo] + [view.wall_albedo] * 3 + [o.albedo for o in view.objects])
    spec_lut = np.array([0.04, 0.0, 0.0, 0.0] + [o.specular for o in view.objects])
    shin_lut = np.array([20.0, 1.0, 1.0, 1.0] + [o.shininess for o in view.objects])
    albedo = albedo_lut[ids]  # (H, W, 3)
    floor = ids == FLOOR
    if view.floor_tile > 0:
        checker = (np.floor(p[0] / view.floor_tile) + np.floor(p[2] / view.floor_tile)) % 2
        albedo = albedo * np.where(floor & (checker > 0), 0.85, 1.0)[..., None]
    ndotl = nw[0] * light[0] + nw[1] * light[1] + nw[2] * light[2]
    lit = np.clip(ndotl, 0.0, None)
    if view.shadows and view.objects:
        lit = lit * _visibility(view, ids, p, nw, ndotl > 0)
    # Blinn-Phong half vector between the light and the direction back to the camera.
    inv = 1.0 / np.sqrt(dirs[0] ** 2 + dirs[1] ** 2 + dirs[2] ** 2)
    hx, hy, hz = light[0] - dirs[0] * inv, light[1] - dirs[1] * inv, light[2] - dirs[2] * inv
    hn = np.sqrt(hx * hx + hy * hy + hz * hz)
    ndoth = np.clip((nw[0] * hx + nw[1] * hy + nw[2] * hz) / hn, 0.0, 1.0)
    spec = spec_lut[ids] * ndoth ** shin_lut[ids] * (lit > 0)
    diffuse = view.ambient + view.light_intensity * lit
    return albedo * diffuse[..., None] + (view.light_intensity * spec)[..., None]


def _visibility(view, ids, p, nw, lit_mask):
    """1 where the light reaches a surface point, 0 where an object blocks it."""
    light = view.light_dir
    vis = np.ones(ids.shape)
    # Light-space coordinates: two axes across the light direction and one along it. An object can
    # only shadow points whose across-coordinates fall in its box and that lie below its top.
    e1 = _cross(light, [0.0, 0.0, 1.0] if abs(light[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = _cross(light, e1)
    rr, cc = np.nonzero(lit_mask)
    if rr.size == 0:
        return vis
    pts = np.stack([q[rr, cc] for q in p])
    nrm = nw[:, rr, cc]
    a, b, c = e1 @ pts, e2 @ pts, light @ pts
    shadowed = np.zeros(rr.size, bool)
    own = ids[rr, cc]
    for k, obj in enumerate(view.objects):
        cor = obj.aabb_corners()
        ca, cb, cc_ = cor @ e1, cor @ e2, cor @ light
        cand = np.nonzero((a >= ca.min()) & (a <= ca.max()) & (b >= cb.min()) & (b <= cb.max())
                          & (c < cc_.max()) & (own != OBJECT_BASE + k) & ~shadowed)[0]
        if cand.size == 0:
            continue
        origin = tuple(pts[i, cand] + _SHADOW_EPS * nrm[i, cand] for i in range(3))
        t = INTERSECT[obj.shape](obj, origin, tuple(light), 0.0)
        shadowed[cand[np.isfinite(t)]] = True
    vis[rr[shadowed], cc[shadowed]] = 0.0
    return vis
