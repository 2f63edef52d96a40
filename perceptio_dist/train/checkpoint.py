"""Checkpoints that are complete or invisible, and resume that falls back past damaged ones.

Layout under ``checkpoint.dir``:

    global_step00000012/            DeepSpeed's sharded per-rank files (model and optimizer partitions)
        rank00000_state.pt          per rank: loader state, RNG states (torch.save of plain data and tensors)
        COMPLETE.json               written last by rank 0: step, reason, every file's size and sha256
    latest                          the newest published tag
    *.tmp/                          a save in progress (or killed mid-way): never resumed from

A save goes to ``<tag>.tmp``; after every rank has finished (barrier), rank 0 lists the files with
sizes and checksums into COMPLETE.json, renames the folder to ``<tag>`` and only then points
``latest`` at it; older checkpoints beyond ``keep_last`` are removed. Resume takes the newest
checkpoint whose files all match COMPLETE.json and logs every one it skips and why.

This module is the one home of the format: finding, verifying and publishing checkpoints, reading what a
checkpoint says about itself (step, rank count, the config it was trained with) and converting it to
DeepSpeed's universal format for another rank count. The trainer, export and evaluation go through it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

from ..config import ConfigError
from ..data.shards import file_sha256
from ..parallel.distributed import DistInfo, barrier

log = logging.getLogger("perceptio_dist.checkpoint")
MARKER = "COMPLETE.json"
CONFIG_FILE = "config.yaml"  # the resolved training config, readable without DeepSpeed
CONSOLIDATED_FILE = "consolidated_weights.safetensors"  # tensor-parallel runs: the whole module's weights
TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step:08d}"


def rng_state() -> dict:
    """Every generator a step draws from: Python, NumPy, torch's CPU one and, on a GPU, the rank's CUDA one (mask
    point sampling, dropout and drop-path on the device draw from it)."""
    state = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [state[0], list(state[1]), state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()  # the current device's: each rank saves its own
    return out


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        else:
            log.warning("the checkpoint holds no CUDA random state (saved on CPUs, or by an older version): "
                        "random draws on the GPU differ from the interrupted run's from here on")


@dataclass
class Resumable:
    path: Path
    step: int


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a published checkpoint folder (its marker was written last, so the save finished)."""
    return (Path(path) / MARKER).is_file()


def newest_complete(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint; for a run's checkpoints folder, its newest complete checkpoint;
    otherwise ``path`` unchanged (the caller reports it)."""
    path = Path(path)
    if is_complete(path) or not path.is_dir():
        return path
    found = [(int(m.group(1)), p) for p in path.glob("global_step*") if (m := TAG.match(p.name)) and is_complete(p)]
    return max(found)[1] if found else path


def read_marker(path: str | Path) -> dict:
    """The marker of a complete checkpoint: step, reason, world_size, time, files."""
    return json.loads((Path(path) / MARKER).read_text())


def saved_world_size(path: str | Path) -> int:
    return int(read_marker(path)["world_size"])


def saved_config(path: str | Path) -> dict:
    """The config a checkpoint was trained with, as the plain mapping it was saved as (``config_from_dict`` types it)."""
    import yaml

    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise ConfigError(f"Config error at 'checkpoint': {path} has no {CONFIG_FILE} (not a perceptio_dist "
                          "checkpoint, or saved before exports were possible).")
    return yaml.safe_load(file.read_text())


class CheckpointManager:
    def __init__(self, folder: Path, dist: DistInfo, keep_last: int = 3, verify_checksums: bool = True):
        self.folder, self.dist, self.keep_last, self.verify_checksums = Path(folder), dist, keep_last, verify_checksums

    # --------------------------------------------------------------------------------- save

    def save(self, engine, step: int, client_state: dict, rank_state: dict, reason: str, config_yaml: str = "") -> Path:
        tag = tag_for(step)
        tmp = self.folder / f"{tag}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier at the same step
            tmp.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(self.folder), tag=tmp.name, client_state=client_state, save_latest=False)
        torch.save(rank_state, tmp / f"rank{self.dist.rank:05d}_state.pt")
        if engine.autotp_size() > 1:
            # Tensor-parallel weights are sharded by rank, which zero_to_fp32 cannot merge: the whole module's
            # weights, gathered by DeepSpeed (every rank takes part), go beside the shards for perceptio-export.
            whole = engine._consolidated_16bit_state_dict()
            if self.dist.is_main:
                buffers = {name for name, _ in engine.module.named_buffers()}
                whole.update({k: v.detach().cpu() for k, v in engine.module.state_dict().items()
                              if k in buffers})  # persistent buffers (replicated)
                save_file({k: v.contiguous() for k, v in whole.items()}, str(tmp / CONSOLIDATED_FILE))
        if self.dist.is_main and config_yaml:  # the resolved config, readable without DeepSpeed (export, inspection)
            (tmp / CONFIG_FILE).write_text(config_yaml)
        barrier()  # every rank's files are on disk
        final = self.folder / tag
        rels = [str(path.relative_to(tmp)) for path in sorted(p for p in tmp.rglob("*") if p.is_file())]
        # Each rank hashes its share of the files (about 114 GB at 8B: rank 0 alone would keep every rank waiting).
        sums = self._shared_out(rels, lambda rel: file_sha256(tmp / rel)) if self.verify_checksums else {}
        if self.dist.is_main:
            files = {rel: {"size": (tmp / rel).stat().st_size, "sha256": sums.get(rel)} for rel in rels}
            marker = {"step": step, "reason": reason, "world_size": self.dist.world_size, "time": time.time(),
                      "files": files}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest = self.folder / "latest.tmp"
            latest.write_text(tag)
            os.replace(latest, self.folder / "latest")
            self._prune()
        barrier()
        log.info("checkpoint %s saved (%s)", final, reason)
        return final

    def _prune(self) -> None:
        complete = [p for p, _ in self.published()]
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)

    # --------------------------------------------------------------------------------- load

    def published(self) -> list[tuple[Path, int]]:
        """Published checkpoints, newest first (not yet verified)."""
        found = []
        for p in self.folder.glob("global_step*"):
            match = TAG.match(p.name)
            if match and p.is_dir():
                found.append((p, int(match.group(1))))
        return sorted(found, key=lambda x: -x[1])

    def verify(self, path: Path) -> Optional[str]:
        """None if every file matches the marker, else what is wrong. Every rank gets the same verdict: sizes are
        checked by each, checksums split over the ranks present now (their count may differ from the save's)."""
        marker = path / MARKER
        if not marker.exists():
            return "no COMPLETE.json (the save did not finish)"
        try:
            files = json.loads(marker.read_text())["files"]
        except (json.JSONDecodeError, KeyError) as exc:
            return f"unreadable COMPLETE.json ({exc})"
        for rel, info in files.items():
            f = path / rel
            if not f.exists():
                return f"{rel} is missing"
            if f.stat().st_size != info["size"]:
                return f"{rel} has {f.stat().st_size} bytes, {info['size']} were written"
        if not self.verify_checksums:
            return None
        to_check = [rel for rel, info in files.items() if info.get("sha256")]
        sums = self._shared_out(to_check, lambda rel: file_sha256(path / rel))
        for rel in to_check:
            if sums[rel] != files[rel]["sha256"]:
                return f"{rel} does not match its checksum"
        return None

    def _shared_out(self, items: list[str], work) -> dict:
        """{item: work(item)} for every item, each computed by one rank (item i by rank i mod world size) and
        gathered on all: every rank ends with the same answers."""
        import torch.distributed as dist

        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        mine = {item: work(item) for i, item in enumerate(items) if i % world == rank}
        if world == 1 or not dist.is_initialized():
            return mine
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def explicit(self, path: str | Path) -> Resumable:
        """A checkpoint named by the user (``checkpoint.resume=PATH``): verified, and its folder becomes the one saved to."""
        path = Path(path)
        problem = self.verify(path) if path.exists() else "it does not exist"
        if problem:
            raise ConfigError(f"Config error at 'checkpoint.resume': cannot resume from {path}: {problem}.")
        self.folder = path.parent
        return Resumable(path, int(read_marker(path)["step"]))

    def to_universal(self, found: Resumable) -> Resumable:
        """DeepSpeed's ds_to_universal (rank 0, once per checkpoint), so another rank count can load it.

        Universal checkpoints carry no per-rank files: the loader state then comes from rank 0's client state.
        """
        out = found.path.parent / f"{found.path.name}_universal"
        if self.dist.is_main and not (out / "DONE").exists():
            log.info("rank count changed (%d -> %d): converting %s to the universal format",
                     saved_world_size(found.path), self.dist.world_size, found.path.name)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(found.path),
                   "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed:\n{proc.stderr[-3000:]}")
            (out / "DONE").write_text("")
        barrier()
        return Resumable(out, found.step)

    def find_resumable(self) -> Optional[Resumable]:
        for path, step in self.published():
            problem = self.verify(path)
            if problem is None:
                return Resumable(path, step)
            log.warning("checkpoint %s is damaged (%s): falling back to the previous one", path.name, problem)
        return None

    def load(self, engine, found: Resumable, rank_file_rank: Optional[int] = None) -> tuple[dict, Optional[dict]]:
        """Load into ``engine``; returns (client state, this rank's saved state or None after an elastic resume)."""
        _, client = engine.load_checkpoint(str(self.folder), tag=found.path.name, load_module_strict=True)
        rank = self.dist.rank if rank_file_rank is None else rank_file_rank
        rank_file = found.path / f"rank{rank:05d}_state.pt"
        same_layout = is_complete(found.path) and saved_world_size(found.path) == self.dist.world_size
        rank_state = torch.load(rank_file, weights_only=True) if rank_file.exists() and same_layout else None
        return client or {}, rank_state
