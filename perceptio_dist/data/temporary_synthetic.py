"""TEMPORARY batch source: deterministic, in-process, well-formed samples that exercise every loss term.

It stands in for the real data pipeline (pybullet scenes, dataset adapters, webdataset shards)
until that lands, and will be removed then. Each sample is a flat-coloured box in front of a
floor-like background whose depth grows towards the top of the image:

* the box is the referring-segmentation target ("Segment the red box."),
* the depth map is exact (box nearer than the background), normalised inverse depth,
* the depth codes are a stand-in for the VQ-VAE's: the map average-pooled to the grid and
  quantised into K levels (the real codes come from the trained tokenizer),
* some samples have no [SEG] or no depth block, some neither (plain VQA).

Content depends only on (seed, index), so every rank and every restart sees the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..config import TemporarySyntheticConfig
from ..model.spatial_tokens import SpatialTokenIds
from .batch import Sample
from .conversation import ImageTokens, encode_conversation, spatial_answer_ids
from .depth import normalise_inverse_depth
from .images import resize_mask, resize_normalised, to_tensor

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 20), "white": (240, 240, 240), "black": (20, 20, 20),
}


@dataclass(frozen=True)
class SampleGeometry:
    """Sizes every sample must match; they come from the model config."""

    tile_size: int  # InternVL tile side
    sam_size: int  # SAM2 input side
    depth_size: int  # VQ-VAE input side
    depth_grid: int
    num_codes: int


class TemporarySyntheticSource:
    def __init__(
        self,
        cfg: TemporarySyntheticConfig,
        seed: int,
        geometry: SampleGeometry,
        tokenizer: PreTrainedTokenizerBase,
        token_ids: SpatialTokenIds,
        image_tokens: ImageTokens,
    ):
        self.cfg, self.seed, self.geo = cfg, seed, geometry
        self.tokenizer, self.ids, self.image_tokens = tokenizer, token_ids, image_tokens

    def scene(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        size = self.cfg.image_size
        names = list(COLOURS)
        name = names[rng.integers(len(names))]
        w, h = (rng.uniform(0.25, 0.6, size=2) * size).astype(int)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        rows = np.linspace(8.0, 2.0, size)[:, None].repeat(size, 1)  # far at the top, near at the bottom
        depth = rows.copy()
        depth[y0 : y0 + h, x0 : x0 + w] = rng.uniform(1.0, 1.8)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y0 : y0 + h, x0 : x0 + w] = 1
        background = rng.integers(60, 200, size=3)
        shade = (2.0 / depth)[..., None]  # nearer is brighter
        image = np.clip(background[None, None] * (0.5 + 0.5 * shade), 0, 255)
        image[mask.astype(bool)] = COLOURS[name]
        return dict(
            image=image.astype(np.uint8), depth=depth.astype(np.float32), mask=mask, colour=name,
            with_seg=bool(rng.random() < self.cfg.seg_fraction),
            with_depth=bool(rng.random() < self.cfg.depth_fraction),
        )

    def stand_in_codes(self, depth_map: torch.Tensor) -> list[int]:
        """Pool the normalised map to the grid and quantise to K levels (stand-in for VQ-VAE codes)."""
        pooled = F.adaptive_avg_pool2d(depth_map[None], self.geo.depth_grid).flatten()
        return (pooled * self.geo.num_codes).long().clamp(0, self.geo.num_codes - 1).tolist()

    def __getitem__(self, index: int) -> Sample:
        s = self.scene(index)
        image = to_tensor(s["image"])
        depth_full = torch.from_numpy(s["depth"])[None, None]
        depth_map = F.interpolate(depth_full, size=(self.geo.depth_size,) * 2, mode="bilinear", align_corners=False)[0]
        depth_map = normalise_inverse_depth(1.0 / depth_map)  # [1, D, D]
        box = f"the {s['colour']} box"
        if s["with_seg"] and s["with_depth"]:
            question, answer = f"Segment {box} and estimate the depth.", f"It is {box}, the closest object."
        elif s["with_seg"]:
            question, answer = f"Segment {box}.", f"It is {box}."
        elif s["with_depth"]:
            question, answer = "Which object is the closest to the camera?", f"The {s['colour']} box."
        else:
            question, answer = "What colour is the box?", f"It is {s['colour']}."
        codes = self.stand_in_codes(depth_map) if s["with_depth"] else None
        input_ids, labels = encode_conversation(
            self.tokenizer, self.image_tokens, 1, question, spatial_answer_ids(self.ids, s["with_seg"], codes), answer
        )
        n_blocks = 1 if s["with_depth"] else 0
        return Sample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=resize_normalised(image, self.geo.tile_size)[None],
            sam_image=resize_normalised(image, self.geo.sam_size),
            seg_masks=resize_mask(s["mask"], self.geo.sam_size)[None] if s["with_seg"]
            else torch.zeros(0, self.geo.sam_size, self.geo.sam_size),
            teacher_depth=depth_map[None] if n_blocks else torch.zeros(0, 1, self.geo.depth_size, self.geo.depth_size),
            has_teacher_depth=torch.ones(n_blocks, dtype=torch.bool),
        )
