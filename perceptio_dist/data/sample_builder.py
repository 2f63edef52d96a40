"""A stored shard sample -> a training :class:`Sample` (runs in the DataLoader workers).

* the image through InternVL's own preprocessing (transformers' GotOcr2 image processor, the one
  InternVL's processor uses): dynamic tiling into ``tile`` x ``tile`` tiles plus a thumbnail, at most
  ``max_tiles``; ``image_tokens_per_tile`` context tokens per tile;
* the whole image resized for SAM2, the mask at SAM2's input size;
* the depth codes and teacher map (unless the no-depth-token ablation drops them);
* the conversation with the chat template and the label mask (data/conversation.py);
* then the ``input_transforms`` an experiment configured (:class:`SampleOptions`, registry.SAMPLE_OPTIONS), each
  ``(input_ids, labels, info, key) -> input_ids``: they may change what the model reads, never the labels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..model.geometry import SampleGeometry
from ..model.spatial_tokens import SpatialTokenIds
from .batch import Sample
from .conversation import ImageTokens, encode_conversation, spatial_answer_ids
from .images import IMAGENET_MEAN, IMAGENET_STD, resize_mask, resize_normalised, to_tensor
from .shards import ShardSample, npy_load


class SampleTooLong(ValueError):
    pass


InputTransform = Callable[[torch.Tensor, torch.Tensor, dict, str], torch.Tensor]


@dataclass
class SampleOptions:
    """What an experiment may change in how a stored sample becomes model inputs (registry.SAMPLE_OPTIONS)."""

    image_after_question: bool = False  # the image span after the question in the first user turn
    input_transforms: list[InputTransform] = field(default_factory=list)  # applied in order, after encoding


class SampleBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, token_ids: SpatialTokenIds, image_tokens: ImageTokens,
                 geometry: SampleGeometry, max_seq_len: int, depth_tokens: bool = True,
                 input_transforms: tuple[InputTransform, ...] = ()):
        from transformers import GotOcr2ImageProcessorPil

        self.tokenizer, self.ids, self.image_tokens, self.geo = tokenizer, token_ids, image_tokens, geometry
        self.max_seq_len, self.depth_tokens = max_seq_len, depth_tokens
        self.input_transforms = tuple(input_transforms)
        self.processor = GotOcr2ImageProcessorPil(
            size={"height": geometry.tile_size, "width": geometry.tile_size},
            crop_to_patches=geometry.max_tiles > 1, min_patches=1, max_patches=geometry.max_tiles,
            image_mean=IMAGENET_MEAN.flatten().tolist(), image_std=IMAGENET_STD.flatten().tolist(),
        )

    def tiles(self, image: np.ndarray) -> torch.Tensor:
        out = self.processor(images=[image], return_tensors="pt")
        return out["pixel_values"]

    def __call__(self, stored: ShardSample) -> Sample:
        geo, info = self.geo, stored.info
        image = np.asarray(Image.open(io.BytesIO(stored.image)).convert("RGB"))
        pixel_values = self.tiles(image)
        masks = torch.zeros(0, geo.sam_size, geo.sam_size)
        if info["with_seg"]:
            mask = np.asarray(Image.open(io.BytesIO(stored.mask_png)).convert("L")) > 127
            if mask.shape != image.shape[:2] or not mask.any():
                raise ValueError(f"mask {mask.shape} does not fit image {image.shape[:2]} or is empty")
            masks = resize_mask(mask.astype(np.uint8), geo.sam_size)[None]
        codes, depth = None, torch.zeros(0, 1, geo.depth_size, geo.depth_size)
        if info["with_depth"] and self.depth_tokens:
            codes = npy_load(stored.codes_npy).astype(np.int64)
            depth_map = npy_load(stored.depth_npy).astype(np.float32)
            if codes.shape != (geo.num_depth_tokens,) or codes.max() >= geo.num_codes or codes.min() < 0:
                raise ValueError(f"codes {codes.shape} do not fit N={geo.num_depth_tokens}, K={geo.num_codes}")
            if depth_map.shape != (geo.depth_size, geo.depth_size):
                raise ValueError(f"depth map {depth_map.shape} is not {geo.depth_size}x{geo.depth_size}")
            depth = torch.from_numpy(depth_map)[None, None]
        spatial = spatial_answer_ids(self.ids, info["with_seg"], None if codes is None else codes.tolist())
        input_ids, labels = encode_conversation(self.tokenizer, self.image_tokens, pixel_values.shape[0],
                                                info["turns"], spatial)
        if input_ids.numel() > self.max_seq_len:
            raise SampleTooLong(f"{input_ids.numel()} tokens > data.max_seq_len={self.max_seq_len}")
        for transform in self.input_transforms:
            input_ids = transform(input_ids, labels, info, stored.key)
        return Sample(
            input_ids=input_ids, labels=labels, pixel_values=pixel_values,
            sam_image=resize_normalised(to_tensor(image), geo.sam_size), seg_masks=masks, teacher_depth=depth,
            has_teacher_depth=torch.ones(depth.shape[0], dtype=torch.bool),
        )
