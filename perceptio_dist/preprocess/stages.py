"""The stages of the preprocessing job, as plain functions and callable classes.

preprocess/job.py wires them into a Ray Data pipeline:

    plan (driver) -> decode_row (tasks) -> DepthStage (actor pool) -> CodeStage (actor pool) -> write_shard_rows
    (the driver, as soon as a shard's last row arrives)

Rows are dicts of strings and bytes (encoded images, PNG masks, .npy arrays), so they move through
Ray's object store without custom types. A bad record never raises: its row carries ``error``
and ends up in the quarantine list of its shard.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .records import Record
from ..data.shards import ShardSample, npy_bytes, npy_load, plan_hash, shard_name, sidecar_path, write_shard

LETTERS = "ABCDE"


# ----------------------------------------------------------------------------- planning


@dataclass
class ShardPlan:
    name: str  # e.g. "referring_seg/referring_seg-000003"
    task: str
    records: list[Record]

    @property
    def plan(self) -> str:
        return plan_hash([r.key for r in self.records])


def plan_shards(records: list[Record], shard_size: int) -> list[ShardPlan]:
    """Deterministic assignment: per task, records sorted by key, cut into shards of ``shard_size``."""
    seen: set[str] = set()
    by_task: dict[str, list[Record]] = {}
    for record in records:
        if record.key in seen:
            raise ValueError(f"duplicate record key {record.key!r}: source keys must be unique")
        seen.add(record.key)
        by_task.setdefault(record.task, []).append(record)
    plans = []
    for task in sorted(by_task):
        ordered = sorted(by_task[task], key=lambda r: r.key)
        for i in range(0, len(ordered), shard_size):
            plans.append(ShardPlan(shard_name(task, i // shard_size), task, ordered[i : i + shard_size]))
    return plans


# ------------------------------------------------------------------------------ decoding


# The toy "colour" style's letter colours (records.MARKER_STYLES): far apart in hue, none a scene colour's twin.
MARKER_COLOURS = {"A": (255, 0, 0), "B": (0, 255, 0), "C": (0, 90, 255), "D": (255, 255, 0), "E": (255, 0, 255)}


def marker_label_size(image_width: int, style: str = "hardblink") -> int:
    """Height in pixels of what identifies a marker on an image this wide: the letter (hardblink) or the
    coloured disc (colour)."""
    if style == "colour":
        return max(9, round(0.07 * image_width))
    return max(9, round(0.035 * image_width))


def draw_markers(image: Image.Image, points: list[list[float]], style: str = "hardblink") -> Image.Image:
    """Markers labelled A, B, ... in ``style`` (records.MARKER_STYLES)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    w = image.width
    if style == "colour":  # a disc in the letter's colour, ringed in black, the letter in black on it
        radius = marker_label_size(w, style) / 2
        font = ImageFont.load_default(size=max(8, round(1.2 * radius)))
        for letter, (x, y) in zip(LETTERS, points):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=MARKER_COLOURS[letter],
                         outline=(0, 0, 0), width=max(1, round(radius / 5)))
            draw.text((x, y), letter, fill=(0, 0, 0), font=font, anchor="mm")
        return image
    radius = max(3, round(0.012 * w))
    font = ImageFont.load_default(size=marker_label_size(w))
    for letter, (x, y) in zip(LETTERS, points):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 0, 0), width=max(1, radius // 2))
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        tx, ty = x - (right - left) / 2, y - radius - (bottom - top) - 6
        draw.rectangle([tx - 2, ty - 2 + top, tx + (right - left) + 2, ty + bottom + 2], fill=(0, 0, 0))
        draw.text((tx, ty), letter, fill=(255, 255, 255), font=font)
    return image


def decode_mask(mask: dict, height: int, width: int) -> np.ndarray:
    """A Record mask (COCO polygons or RLE, or a value in an instance PNG) -> H x W uint8 {0, 1}."""
    if "png" in mask:
        ids = np.asarray(Image.open(mask["png"]))
        if ids.shape[:2] != (height, width):
            raise ValueError(f"instance map is {ids.shape[:2]}, image is {(height, width)}")
        return (ids == mask["value"]).astype(np.uint8)
    from pycocotools import mask as coco_mask

    h, w = mask.get("size", [height, width])
    if "polygons" in mask:
        polygons = [p for p in mask["polygons"] if len(p) >= 6]
        if not polygons:
            raise ValueError("polygon segmentation with no polygon of 3+ points")
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, h, w))
    else:
        rle = mask["rle"]
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(rle, h, w)
        elif isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode()}
    decoded = coco_mask.decode(rle)
    if decoded.shape != (height, width):
        raise ValueError(f"mask is {decoded.shape}, image is {(height, width)}")
    return decoded.astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_row(row: dict, max_image_side: int = 1024) -> dict:
    """Load and validate one record: image (markers drawn, downscaled if huge), mask, ground-truth depth."""
    out = {**row, "image": b"", "image_ext": "", "mask": b"", "gt_depth": b"", "error": ""}
    try:
        record = Record.from_dict(json.loads(row["record"]))
        raw = Path(record.image).read_bytes()
        image = Image.open(io.BytesIO(raw))
        image.load()
        fmt = (image.format or "").upper()
        image = image.convert("RGB")
        width, height = image.size
        if min(width, height) < 8:
            raise ValueError(f"image is too small ({width}x{height})")
        scale = min(1.0, max_image_side / max(width, height))
        mask = decode_mask(record.mask, height, width) if record.mask is not None else None
        if mask is not None and not mask.any():
            raise ValueError("empty mask")
        depth = None
        if record.depth:
            depth = np.load(record.depth, allow_pickle=False).astype(np.float32)
            if depth.shape != (height, width):
                raise ValueError(f"depth map is {depth.shape}, image is {(height, width)}")
        points = record.points
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(size, Image.BICUBIC)
            mask = None if mask is None else np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
            depth = None if depth is None else np.asarray(Image.fromarray(depth).resize(size, Image.NEAREST))
            points = None if points is None else [[x * scale, y * scale] for x, y in points]
        if points:
            image = draw_markers(image, points, record.marker_style)
        if points or scale < 1.0 or fmt not in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out["image"], out["image_ext"] = buffer.getvalue(), "png"
        else:
            out["image"], out["image_ext"] = raw, "jpg" if fmt == "JPEG" else "png"
        if mask is not None:
            out["mask"] = _png(mask * 255)
        if depth is not None:
            out["gt_depth"] = npy_bytes(depth)
        record.points = points
        out["record"] = json.dumps(record.to_dict())
    except Exception as exc:  # a bad record is quarantined, never fatal
        out["error"] = f"decode: {type(exc).__name__}: {exc}"
    return out


def decode_batch(batch: dict, max_image_side: int = 1024) -> dict:
    """``decode_row`` over a Ray Data batch (fewer, larger tasks than one per record)."""
    rows = [decode_row(row, max_image_side) for row in _rows(batch)]
    return _columns(_worked_on(rows, "decode"), batch)


# Each stage notes the node it ran on in a "<stage>_node" column: the manifest counts records per node and stage,
# so a multi-node run shows where its work went. The shards themselves never carry it.
NODE_COLUMN_SUFFIX = "_node"


def _worked_on(rows: list[dict], stage: str) -> list[dict]:
    try:
        import ray

        node = ray.util.get_node_ip_address() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001  (bookkeeping only: never fail a record for it)
        node = "unknown"
    for row in rows:
        row[stage + NODE_COLUMN_SUFFIX] = node
    return rows


def _image_array(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))


# ------------------------------------------------------------------------ depth and codes


class DepthStage:
    """Adds ``depth`` (normalised inverse depth, float16, out_size^2) to rows that need it.

    Ground truth when the record has it and ``use_ground_truth``; otherwise the teacher."""

    def __init__(self, out_size: int, teacher_path: str | None, input_size: int, use_ground_truth: bool,
                 batch_size: int):
        import torch

        self.out_size, self.use_ground_truth, self.batch_size = out_size, use_ground_truth, batch_size
        self.teacher = None
        if teacher_path:
            from ..teachers.depth_anything import DepthAnythingTeacher

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.teacher = DepthAnythingTeacher(teacher_path, input_size, device)

    def __call__(self, batch: dict) -> dict:
        from ..teachers.depth_anything import inverse_depth_target

        rows = _rows(batch)
        need_teacher = []
        for row in rows:
            row["depth"] = b""
            if row["error"] or not json.loads(row["record"])["with_depth"]:
                continue
            try:
                if row["gt_depth"] and self.use_ground_truth:
                    row["depth"] = npy_bytes(inverse_depth_target(npy_load(row["gt_depth"]), self.out_size)
                                             .astype(np.float16))
                elif self.teacher is not None:
                    need_teacher.append(row)
                else:
                    row["error"] = "depth: the sample needs a depth target but no teacher is configured"
            except Exception as exc:
                row["error"] = f"depth: {type(exc).__name__}: {exc}"
        for start in range(0, len(need_teacher), self.batch_size):
            chunk = need_teacher[start : start + self.batch_size]
            try:
                maps = self.teacher([_image_array(r) for r in chunk], self.out_size)
                for row, depth in zip(chunk, maps):
                    row["depth"] = npy_bytes(depth.astype(np.float16))
            except Exception as exc:
                for row in chunk:
                    row["error"] = f"teacher: {type(exc).__name__}: {exc}"
        return _columns(_worked_on(rows, "teacher"), batch)


class CodeStage:
    """Adds ``codes`` (the depth tokenizer's N codes, uint8 when K <= 256) to rows with a depth map."""

    def __init__(self, vqvae_config: dict, num_codes: int, grid: int, checkpoint: str | None, seed: int):
        import torch

        from ..model.config import DepthVQVAEConfig
        from ..model.depth_vqvae import DepthVQVAE, load_depth_vqvae

        torch.manual_seed(seed)
        arch = DepthVQVAEConfig(**vqvae_config)
        model = load_depth_vqvae(arch, num_codes, grid, checkpoint) if checkpoint else DepthVQVAE(arch, num_codes, grid)
        self.model = model.eval()
        self.dtype = np.uint8 if num_codes <= 256 else np.uint16

    def __call__(self, batch: dict) -> dict:
        import torch

        rows = _rows(batch)
        todo = [r for r in rows if not r["error"] and r["depth"]]
        for row in rows:
            row["codes"] = b""
        if todo:
            maps = torch.from_numpy(np.stack([npy_load(r["depth"]).astype(np.float32) for r in todo]))[:, None]
            with torch.no_grad():
                codes = self.model.encode(maps).numpy().astype(self.dtype)
            for row, c in zip(todo, codes):
                row["codes"] = npy_bytes(c)
        return _columns(_worked_on(rows, "codes"), batch)


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _columns(rows: list[dict], like: dict) -> dict:
    keys = list(rows[0]) if rows else list(like)
    return {k: [r[k] for r in rows] for k in keys}


# -------------------------------------------------------------------------------- writing


def sample_from_row(row: dict) -> ShardSample:
    record = json.loads(row["record"])
    image = Image.open(io.BytesIO(row["image"]))
    info = {k: record[k] for k in ("key", "task", "source", "turns", "with_seg", "with_depth", "points", "meta")}
    info["image_size"] = [image.height, image.width]
    return ShardSample(key=record["key"], image=row["image"], image_ext=row["image_ext"], info=info,
                       mask_png=row["mask"], depth_npy=row["depth"], codes_npy=row.get("codes", b""))  # none in a teacher pass


def _records_per_node(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per stage, how many of the shard's records each node processed."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        for column, node in row.items():
            if column.endswith(NODE_COLUMN_SUFFIX):
                per_node = out.setdefault(column[: -len(NODE_COLUMN_SUFFIX)], {})
                per_node[node] = per_node.get(node, 0) + 1
    return out


def batch_rows(batch: dict) -> list[dict]:
    """A Ray Data numpy batch as plain rows."""
    return _rows(batch)


def write_shard_rows(rows: list[dict], out_dir: str, producer: dict | None = None) -> dict:
    """Write one shard from all of its rows and its completion marker; return its stats. The rows are sorted by
    record key first, so the tar's bytes do not depend on the order the pipeline delivered them in. ``producer``
    (what made the contents: tokenizer, teacher, answer format, recipe) goes into the marker."""
    rows = sorted(rows, key=lambda r: json.loads(r["record"])["key"])
    shard = rows[0]["shard"]
    out = Path(out_dir)
    good = [r for r in rows if not r["error"]]
    quarantined = []
    for r in rows:
        if r["error"]:
            rec = json.loads(r["record"])
            quarantined.append({"key": rec["key"], "source": rec["source"], "image": rec["image"], "reason": r["error"]})
    samples = [sample_from_row(r) for r in good]
    sha = write_shard(out / f"{shard}.tar", samples)
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.info["source"]] = counts.get(s.info["source"], 0) + 1
    stats = {
        "shard": shard, "task": shard.split("/")[0], "num_samples": len(samples), "sha256": sha,
        "bytes": (out / f"{shard}.tar").stat().st_size,
        "plan": plan_hash([json.loads(r["record"])["key"] for r in rows]),
        "keys": [s.key for s in samples], "sources": counts, "quarantined": quarantined, "written": time.time(),
        "producer": producer,
        "nodes": _records_per_node(rows),
        # what the answers carry (training and evaluation force only the chain a task was trained with)
        "chain": {"with_seg": sum(bool(s.info["with_seg"]) for s in samples),
                  "with_depth": sum(bool(s.info["with_depth"]) for s in samples)},
    }
    sidecar_path(out, shard).write_text(json.dumps(stats))
    return stats
