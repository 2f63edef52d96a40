"""Image tensors for the two image paths: InternVL tiles and the whole image for SAM2.

Both use ImageNet statistics (InternVL's processor and SAM2's transforms do). InternVL's dynamic
tiling itself goes through transformers' image processor (data/sample_builder.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # a writable copy


def resize_normalised(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [3, size, size], ImageNet-normalised (whole image, aspect not kept, as SAM2)."""
    resized = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (resized - IMAGENET_MEAN) / IMAGENET_STD


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """HxW {0,1} -> [size, size] float, nearest neighbour (keeps the mask binary)."""
    t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0]
