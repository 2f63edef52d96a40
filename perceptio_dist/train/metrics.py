"""Metrics sinks: a JSONL file in the run folder (always) and wandb (offline unless a key is set)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from pathlib import Path

import torch

from .config import LoggingConfig

log = logging.getLogger(__name__)


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._wandb = None
        mode = wandb_mode(cfg.wandb)
        if enabled and mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=cfg.wandb_project, name=cfg.run_name or run_dir.name, dir=str(run_dir), mode=mode,
                    config=config_dict, resume="allow",
                )
                log.info("wandb %s run in %s", mode, run_dir / "wandb")
            except Exception as exc:  # metrics must never take the run down
                log.warning("wandb disabled: %s", exc)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
