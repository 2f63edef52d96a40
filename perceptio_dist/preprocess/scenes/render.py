"""Synthetic spatial scenes rendered with pybullet's CPU renderer (TinyRenderer, headless).

A room (floor and four walls, so every pixel has a depth), a table, and 3-5 objects on it: spheres,
cubes, cylinders, capsules and pybullet's duck and teddy meshes, with random colours, positions and
yaws, seen from a random camera. Each render gives the RGB image, exact metric depth (camera
z-distance in metres, from the z-buffer), and per-object instance masks, plus what spatial
questions need: each object's name, colour, world position, visible area, pixel centroid and depth.

Everything depends only on the seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (0.86, 0.12, 0.12), "green": (0.13, 0.65, 0.25), "blue": (0.15, 0.3, 0.88),
    "yellow": (0.92, 0.82, 0.15), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
}
KINDS = ("sphere", "cube", "cylinder", "capsule", "duck", "teddy")
TABLE_TOP = 0.626  # height of pybullet_data's table/table.urdf top surface
NEAR, FAR = 0.05, 8.0
MIN_VISIBLE_FRACTION = 0.002  # of the image, for an object to be referred to


@dataclass
class SceneObject:
    index: int  # instance id - 1 in instances.png
    kind: str
    colour: str
    position: list[float]  # world x, y, z of the base
    visible_pixels: int
    centroid: list[float]  # pixel x, y of the visible part (or -1, -1)
    depth: float  # median metric depth of the visible part (or inf)


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # H x W x 3 uint8
    depth: np.ndarray  # H x W float32, metres
    instances: np.ndarray  # H x W uint8, 0 = background, i + 1 = object i
    objects: list[SceneObject]
    camera: dict

    def visible(self) -> list[SceneObject]:
        limit = MIN_VISIBLE_FRACTION * self.depth.size
        return [o for o in self.objects if o.visible_pixels >= limit]


@contextlib.contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _rgba(colour: tuple[float, float, float]) -> list[float]:
    return [*colour, 1.0]


def _add_object(client, kind: str, colour: str, x: float, y: float, yaw: float, rng) -> int:
    import pybullet as p

    orientation = p.getQuaternionFromEuler([0, 0, yaw])
    rgba = _rgba(COLOURS[colour])
    if kind in ("duck", "teddy"):
        urdf = "duck_vhacd.urdf" if kind == "duck" else "teddy_vhacd.urdf"
        scale = rng.uniform(2.6, 3.4) if kind == "duck" else rng.uniform(2.0, 2.6)
        body = client.loadURDF(urdf, [x, y, TABLE_TOP + 0.2], orientation, globalScaling=scale, useFixedBase=True)
        client.changeVisualShape(body, -1, rgbaColor=rgba, textureUniqueId=-1)
        low = client.getAABB(body)[0][2]
        pos, orn = client.getBasePositionAndOrientation(body)
        client.resetBasePositionAndOrientation(body, [pos[0], pos[1], pos[2] - (low - TABLE_TOP)], orn)
        return body
    if kind == "sphere":
        r = rng.uniform(0.07, 0.11)
        shape, z = client.createVisualShape(p.GEOM_SPHERE, radius=r, rgbaColor=rgba), r
    elif kind == "cube":
        h = rng.uniform(0.06, 0.09)
        shape, z = client.createVisualShape(p.GEOM_BOX, halfExtents=[h, h, h], rgbaColor=rgba), h
    elif kind == "cylinder":
        r, length = rng.uniform(0.05, 0.08), rng.uniform(0.15, 0.28)
        shape, z = client.createVisualShape(p.GEOM_CYLINDER, radius=r, length=length, rgbaColor=rgba), length / 2
    else:  # capsule: pybullet's capsule axis is z
        r, length = rng.uniform(0.04, 0.06), rng.uniform(0.08, 0.16)
        shape, z = client.createVisualShape(p.GEOM_CAPSULE, radius=r, length=length, rgbaColor=rgba), length / 2 + r
    return client.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, basePosition=[x, y, TABLE_TOP + z],
                                  baseOrientation=orientation)


def _add_room(client, rng) -> None:
    import pybullet as p

    floor = client.loadURDF("plane.urdf")
    client.changeVisualShape(floor, -1, rgbaColor=_rgba(tuple(rng.uniform(0.3, 0.8, 3))), textureUniqueId=-1)
    wall_rgba = _rgba(tuple(rng.uniform(0.45, 0.95, 3)))
    for x, y, hx, hy in ((2.5, 0, 0.05, 2.5), (-2.5, 0, 0.05, 2.5), (0, 2.5, 2.5, 0.05), (0, -2.5, 2.5, 0.05)):
        shape = client.createVisualShape(p.GEOM_BOX, halfExtents=[hx, hy, 1.5], rgbaColor=wall_rgba)
        client.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, basePosition=[x, y, 1.5])
    table = client.loadURDF("table/table.urdf", [0, 0, 0], useFixedBase=True)
    client.changeVisualShape(table, -1, rgbaColor=_rgba(tuple(rng.uniform(0.35, 0.75, 3))), textureUniqueId=-1)


def _place(rng, count: int) -> list[tuple[float, float]]:
    spots: list[tuple[float, float]] = []
    while len(spots) < count:
        x, y = rng.uniform(-0.55, 0.55), rng.uniform(-0.33, 0.33)
        if all(math.hypot(x - a, y - b) > 0.26 for a, b in spots):
            spots.append((x, y))
    return spots


def render_scene(seed: int, width: int = 320, height: int = 240) -> Scene:
    import pybullet as p
    import pybullet_data
    from pybullet_utils.bullet_client import BulletClient

    rng = np.random.default_rng([seed, 7])
    with _quiet_stdout():  # pybullet's C code prints to fd 1 on connect
        client = BulletClient(connection_mode=p.DIRECT)
    try:
        client.setAdditionalSearchPath(pybullet_data.getDataPath())
        _add_room(client, rng)
        count = int(rng.integers(3, 6))
        kinds = [KINDS[i] for i in rng.integers(0, len(KINDS), count)]
        colours = [list(COLOURS)[i] for i in rng.integers(0, len(COLOURS), count)]
        bodies = [_add_object(client, k, c, x, y, rng.uniform(0, 2 * math.pi), rng)
                  for (x, y), k, c in zip(_place(rng, count), kinds, colours)]
        yaw, pitch, distance = rng.uniform(0, 360), rng.uniform(-55, -30), rng.uniform(0.95, 1.4)
        target = [rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), TABLE_TOP]
        view = client.computeViewMatrixFromYawPitchRoll(target, distance, yaw, pitch, 0, upAxisIndex=2)
        fov = float(rng.uniform(50, 65))
        proj = client.computeProjectionMatrixFOV(fov=fov, aspect=width / height, nearVal=NEAR, farVal=FAR)
        light = [float(v) for v in rng.uniform([-1, -1, 1.5], [1, 1, 3])]
        _, _, rgba, zbuffer, seg = client.getCameraImage(
            width, height, view, proj, renderer=p.ER_TINY_RENDERER, lightDirection=light, shadow=1)
        positions = [list(client.getBasePositionAndOrientation(b)[0]) for b in bodies]
    finally:
        client.disconnect()
    image = np.reshape(np.asarray(rgba, dtype=np.uint8), (height, width, 4))[..., :3].copy()
    z = np.reshape(np.asarray(zbuffer, dtype=np.float64), (height, width))
    depth = (FAR * NEAR / (FAR - (FAR - NEAR) * z)).astype(np.float32)  # z-buffer -> metric depth
    seg = np.reshape(np.asarray(seg), (height, width))
    instances = np.zeros((height, width), dtype=np.uint8)
    objects = []
    for i, (body, kind, colour, pos) in enumerate(zip(bodies, kinds, colours, positions)):
        pixels = seg == body
        instances[pixels] = i + 1
        n = int(pixels.sum())
        ys, xs = np.nonzero(pixels)
        objects.append(SceneObject(
            index=i, kind=kind, colour=colour, position=[round(v, 4) for v in pos], visible_pixels=n,
            centroid=[float(xs.mean()), float(ys.mean())] if n else [-1.0, -1.0],
            depth=float(np.median(depth[pixels])) if n else float("inf"),
        ))
    camera = {"yaw": float(yaw), "pitch": float(pitch), "distance": float(distance), "fov": fov,
              "target": [float(t) for t in target], "width": width, "height": height, "near": NEAR, "far": FAR}
    return Scene(seed, image, depth, instances, objects, camera)


def write_scene(scene: Scene, folder: Path) -> None:
    """rgb.png, depth.npy (float32 metres), instances.png (0 background, i+1 object i), meta.json (written last)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(folder / "rgb.png")
    np.save(folder / "depth.npy", scene.depth)
    Image.fromarray(scene.instances).save(folder / "instances.png")
    meta = {"seed": scene.seed, "camera": scene.camera, "objects": [asdict(o) for o in scene.objects]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def load_scene_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())
