"""Depth conventions shared by data preparation, the tokenizer and evaluation.

The depth tokenizer sees *normalised inverse depth*: ``inv = 1 / depth`` (or a teacher's
relative disparity, already inverse), mapped per image to [0, 1] by its min and max, so near is
1 and far is 0. The map is affine-invariant, like the teachers' outputs; evaluation aligns
predictions to ground truth with a per-image scale and shift.
"""

from __future__ import annotations

import torch


def normalise_inverse_depth(inverse_depth: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max normalisation of ``inverse_depth`` [..., H, W] to [0, 1] (a constant map gives zeros).

    Scale-invariant: any positive range is stretched to [0, 1], however small (teachers differ in scale)."""
    flat = inverse_depth.flatten(-2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    return (inverse_depth - lo) / (hi - lo).clamp_min(eps)
