"""The shard format: webdataset tars plus a manifest.

    <out>/manifest.json                 counts per task and source, shards with checksums, identities, config
    <out>/quarantine.jsonl              records that could not be used, with reasons
    <out>/<task>/<task>-000000.tar      webdataset shard; <task>-000000.json beside it marks it complete

One sample (one webdataset key):
    png | jpg      the image (markers already drawn for relative-depth samples)
    json           task, source, turns, with_seg, with_depth, points, meta, image size
    mask.png       the [SEG] target, 0/255, image resolution (when with_seg)
    depth.npy      float16 normalised inverse depth at the tokenizer's resolution (when with_depth)
    codes.npy      uint8/uint16 depth codes, length N (when with_depth)

Numbers are stored with ``np.save`` and read with ``allow_pickle=False``; nothing in a shard is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"


def shard_name(task: str, index: int) -> str:
    return f"{task}/{task}-{index:06d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_hash(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


@dataclass
class ShardSample:
    """One decoded-to-bytes sample, as stored."""

    key: str
    image: bytes
    image_ext: str
    info: dict
    mask_png: bytes = b""
    depth_npy: bytes = b""
    codes_npy: bytes = b""

    def to_webdataset(self) -> dict:
        sample = {"__key__": self.key, self.image_ext: self.image, "json": json.dumps(self.info).encode()}
        if self.mask_png:
            sample["mask.png"] = self.mask_png
        if self.depth_npy:
            sample["depth.npy"] = self.depth_npy
        if self.codes_npy:
            sample["codes.npy"] = self.codes_npy
        return sample

    @classmethod
    def from_webdataset(cls, sample: dict) -> "ShardSample":
        ext = "png" if "png" in sample else "jpg"
        return cls(
            key=sample["__key__"], image=sample[ext], image_ext=ext, info=json.loads(sample["json"]),
            mask_png=sample.get("mask.png", b""), depth_npy=sample.get("depth.npy", b""),
            codes_npy=sample.get("codes.npy", b""),
        )


def write_shard(path: Path, samples: list[ShardSample]) -> str:
    """Write a tar atomically (temporary name, then rename); return its sha256.

    Member times are fixed, so the same samples always give the same bytes (reproducible checksums)."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as writer:
        for sample in samples:
            writer.write(sample.to_webdataset())
    os.replace(tmp, path)
    return file_sha256(path)


def _all_shards(urls):
    return urls


def read_shard(path: Path) -> Iterator[ShardSample]:
    """Samples of one tar in stored order (webdataset's reader, raw bytes, no automatic decoding).

    The caller picks the shard, so webdataset's own node and worker splitting are switched off."""
    import webdataset as wds

    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=_all_shards,
                             workersplitter=_all_shards)
    for sample in dataset:
        yield ShardSample.from_webdataset(sample)


def sidecar_path(out: Path, shard: str) -> Path:
    return out / f"{shard}.json"


def shard_complete(out: Path, shard: str, expected_plan: str, expected_producer: dict | None = None) -> bool:
    """A shard counts as done when its marker exists, was written for the same records by the same producer
    (tokenizer, teacher, answer format, content-shaping recipe fields) and its tar is intact."""
    marker, tar = sidecar_path(out, shard), out / f"{shard}.tar"
    if not marker.exists() or not tar.exists():
        return False
    info = json.loads(marker.read_text())
    return (info.get("plan") == expected_plan and info.get("producer") == expected_producer
            and info.get("sha256") == file_sha256(tar))


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: is it the output_dir of a finished preprocessing job?")
    return json.loads(path.read_text())
