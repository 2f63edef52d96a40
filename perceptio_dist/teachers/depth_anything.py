"""Depth Anything V2 through transformers' ``DepthAnythingForDepthEstimation`` (eager attention).

Images are resized to a square ``input_size`` (a multiple of 14) so a batch of differently sized
images runs as one tensor; the depth tokenizer sees the whole image as a square too, so nothing
is lost. The model predicts relative *inverse* depth (disparity-like); we resize it to the
tokenizer's resolution and min-max normalise it per image (data/depth.py), which is exactly what
ground-truth depth goes through after inversion.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.depth import normalise_inverse_depth
from ..data.images import IMAGENET_MEAN, IMAGENET_STD


def weights_identity(folder: Path) -> str:
    """A short content hash of a model folder's weight files (recorded in the shard manifest)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


class DepthAnythingTeacher:
    def __init__(self, pretrained_path: str, input_size: int = 518, device: str | torch.device = "cpu"):
        from transformers import DepthAnythingForDepthEstimation

        if input_size % 14:
            raise ValueError("input_size must be a multiple of 14")
        self.path = Path(pretrained_path)
        # A local folder, or a repo id already in the local Hugging Face cache (never downloaded).
        self.model = DepthAnythingForDepthEstimation.from_pretrained(
            pretrained_path, attn_implementation="eager", trust_remote_code=False,
            local_files_only=not self.path.exists(),
        ).to(device).eval()
        self.input_size = input_size
        self.device = torch.device(device)
        folder = self.path if self.path.exists() else Path(self.model.name_or_path)
        self.identity = f"depth_anything:{self.path.name}:{weights_identity(folder)}"

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """H x W x 3 uint8 images -> [B, 3, s, s], bicubic resize and ImageNet normalisation (as DA-V2's processor)."""
        tensors = []
        for image in images:
            t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
            t = F.interpolate(t, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
            tensors.append(((t[0].clamp(0, 1) - IMAGENET_MEAN) / IMAGENET_STD))
        return torch.stack(tensors).to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], out_size: int) -> list[np.ndarray]:
        """Normalised inverse depth, ``out_size`` x ``out_size`` float32 in [0, 1] (1 = nearest), per image."""
        if not images:
            return []
        predicted = self.model(pixel_values=self.preprocess(images)).predicted_depth  # [B, s, s] relative disparity
        resized = F.interpolate(predicted[:, None].float(), size=(out_size, out_size), mode="area")[:, 0]
        return [m.cpu().numpy().astype(np.float32) for m in normalise_inverse_depth(resized)]


def inverse_depth_target(depth: np.ndarray, out_size: int) -> np.ndarray:
    """Ground-truth metric depth -> the same normalised inverse-depth map the teacher produces."""
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        raise ValueError("depth map has no valid pixel")
    filled = np.where(valid, depth, np.median(depth[valid]))
    inverse = torch.from_numpy((1.0 / filled).astype(np.float32))[None, None]
    resized = F.interpolate(inverse, size=(out_size, out_size), mode="area")[0, 0]
    return normalise_inverse_depth(resized).numpy().astype(np.float32)
