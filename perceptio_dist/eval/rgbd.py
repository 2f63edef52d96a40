"""Real RGB-D evaluation frames with ground-truth depth in metres (never used for training).

* ``../shared/data/rgbd/``: TUM, SUN RGB-D and NYU v2 frames, decoded as their README says:
  TUM ``v / 5000``; SUN 16-bit rotate right by 3 then ``/ 1000``; NYU raw Kinect disparity stored
  little-endian in a P5 PGM, ``351.3 / (1092.5 - raw)``, invalid where ``raw >= 2047``; zero is
  invalid for TUM and SUN.
* Middlebury 2014 "motorcycle" shipped with scikit-image: ground-truth disparity, ``inf`` invalid,
  depth in mm ``994.978 * 193.001 / (disp + 31.086)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_RGBD_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "rgbd"


@dataclass
class Frame:
    name: str
    rgb: np.ndarray  # H x W x 3 uint8
    depth: np.ndarray  # H x W float32 metres (0 where invalid)
    valid: np.ndarray  # H x W bool
    files: list[Path] = field(default_factory=list)  # the files it came from (their hashes guard train/eval overlap)

    def file_hashes(self) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in self.files}


def _read_pgm_le16(path: Path) -> np.ndarray:
    """A P5 PGM with 16-bit samples stored little-endian (the NYU frame; PIL would read them big-endian)."""
    data = path.read_bytes()
    tokens, pos = [], 0
    while len(tokens) < 4:  # magic, width, height, maxval; '#' comments allowed
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    if tokens[0] != b"P5":
        raise ValueError(f"{path} is not a binary PGM")
    width, height, maxval = int(tokens[1]), int(tokens[2]), int(tokens[3])
    if maxval < 256:
        raise ValueError(f"{path} is not a 16-bit PGM")
    pos += 1  # the single whitespace after maxval
    return np.frombuffer(data[pos:pos + 2 * width * height], dtype="<u2").reshape(height, width)


def load_tum(folder: Path) -> Frame:
    raw = np.asarray(Image.open(folder / "TUM_depth.png")).astype(np.float32)
    rgb = np.asarray(Image.open(folder / "TUM_color.png").convert("RGB"))
    valid = raw > 0
    return Frame("TUM", rgb, np.where(valid, raw / 5000.0, 0).astype(np.float32), valid,
                 [folder / "TUM_color.png", folder / "TUM_depth.png"])


def load_sun(folder: Path) -> Frame:
    raw = np.asarray(Image.open(folder / "SUN_depth.png")).astype(np.uint32)
    rotated = ((raw >> 3) | (raw << 13)) & 0xFFFF
    rgb = np.asarray(Image.open(folder / "SUN_color.jpg").convert("RGB"))
    valid = raw > 0
    return Frame("SUN", rgb, np.where(valid, rotated / 1000.0, 0).astype(np.float32), valid,
                 [folder / "SUN_color.jpg", folder / "SUN_depth.png"])


def load_nyu(folder: Path) -> Frame:
    raw = _read_pgm_le16(folder / "NYU_depth.pgm").astype(np.float64)
    valid = raw < 2047
    depth = np.where(valid, 351.3 / (1092.5 - np.minimum(raw, 2046)), 0).astype(np.float32)
    rgb = np.asarray(Image.open(folder / "NYU_color.ppm").convert("RGB"))
    return Frame("NYU", rgb, depth, valid & (depth > 0), [folder / "NYU_color.ppm", folder / "NYU_depth.pgm"])


def load_middlebury() -> Frame:
    from skimage import data

    left, _right, disparity = data.stereo_motorcycle()
    valid = np.isfinite(disparity)
    depth = np.where(valid, 994.978 * 193.001 / (np.where(valid, disparity, 0) + 31.086) / 1000.0, 0)
    files = sorted(Path(data.__file__).parent.glob("motorcycle_*"))
    return Frame("Middlebury", np.asarray(left, dtype=np.uint8), depth.astype(np.float32), valid, files)


def evaluation_frames(rgbd_dir: Path | None = DEFAULT_RGBD_DIR) -> list[Frame]:
    """Every frame that is present: the three shared frames (if the folder exists) and Middlebury."""
    frames = []
    if rgbd_dir is not None and Path(rgbd_dir).exists():
        frames += [load_tum(Path(rgbd_dir)), load_sun(Path(rgbd_dir)), load_nyu(Path(rgbd_dir))]
    frames.append(load_middlebury())
    return frames
