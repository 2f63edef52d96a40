"""Mask term: ``bce_weight * BCE + dice_weight * Dice`` on SAM2 mask logits.

Logits come at SAM2's low resolution (4x the image-embedding grid); targets at the SAM2 input
resolution. When the target has more pixels than ``num_points``, both are compared at
``num_points`` uniformly random locations (bilinear sampling, as Mask2Former/SAM do for large
masks); otherwise the logits are upsampled bilinearly and compared densely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask ``1 - (2 sum(p*t) + 1) / (sum(p) + sum(t) + 1)``; ``logits``/``targets`` are [S, M]."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1) + 1
    denominator = probs.sum(-1) + targets.sum(-1) + 1
    return 1 - numerator / denominator


def _sample_points(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` [S, 1, H, W] at ``points`` [S, P, 2] in [0, 1] (x, y) -> [S, P]."""
    grid = (2 * points - 1).unsqueeze(2)  # grid_sample wants [-1, 1]
    # border padding: points near the edge must not blend in zeros from outside the map
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False).squeeze(-1).squeeze(1)


def mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
    num_points: int,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The mask term over masks (``reduction``: 'mean' or 'sum'); ``logits`` [S, 1, h, w], ``targets`` [S, H, W]."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    targets = targets.to(dtype)
    height, width = targets.shape[-2:]
    if num_points and height * width > num_points:
        points = torch.rand(logits.shape[0], num_points, 2, generator=generator, device=logits.device)
        flat_logits = _sample_points(logits, points)
        flat_targets = _sample_points(targets.unsqueeze(1), points)
    else:
        up = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        flat_logits = up.flatten(1)
        flat_targets = targets.flatten(1)
    bce = F.binary_cross_entropy_with_logits(flat_logits, flat_targets, reduction="none").mean(-1)
    dice = dice_loss(flat_logits, flat_targets)
    per_mask = bce_weight * bce + dice_weight * dice
    return per_mask.sum() if reduction == "sum" else per_mask.mean()
