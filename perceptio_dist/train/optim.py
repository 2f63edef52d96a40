"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from ..model.lora import ROW_MASKED


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices; never biases, norm scales or embedding tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 parameters are flat locally
        # Row-masked weights (LoRA's spatial-token rows, model/lora.py): decay would move the rows that must not train.
        (no_decay if ndim < 2 or "embed" in name or hasattr(p, ROW_MASKED) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): (step+1)/warmup, then cosine to the floor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
