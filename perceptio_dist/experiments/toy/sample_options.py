"""How the toy world changes its samples (registered with the core's sample options, registry.SAMPLE_OPTIONS):

* ``model.backbone.image_position: after_question``: the image span follows the question in the first user turn,
  so the distance from image token i to depth token i is the same for every question whatever its length.
  Training and evaluation read it from the same config.
* ``data.depth_context_noise`` (training only): each depth code in a block's *input* is replaced by a random code
  with this probability, the labels keeping the true codes, so the block cannot be predicted from its own earlier
  codes alone and must be read from the image; ``data.depth_context_noise_tasks`` limits it to some tasks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ...config.extensions import extension_value
from ...model.spatial_tokens import SpatialTokenIds
from ...registry import SAMPLE_OPTIONS


@dataclass(frozen=True)
class CodeContextNoise:
    """An input transform (data/sample_builder.py): each code of a depth block's input replaced with probability
    ``rate`` by a uniform random code. Drawn from the sample key (and the seed), so any rank, worker or resume draws
    the same; the same sample is corrupted the same way every epoch. Labels keep the true codes: position t still
    predicts code t+1, only from a context in which earlier codes cannot be trusted."""

    rate: float
    seed: int
    code_start: int
    code_end: int
    tasks: Optional[frozenset[str]] = None  # None: every task

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, info: dict, key: str) -> torch.Tensor:
        if self.tasks is not None and info["task"] not in self.tasks:
            return input_ids
        is_code = (labels >= self.code_start) & (labels < self.code_end)
        if not bool(is_code.any()):
            return input_ids
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        flip = torch.from_numpy(rng.random(input_ids.numel()) < self.rate) & is_code
        random_codes = torch.from_numpy(rng.integers(self.code_start, self.code_end, input_ids.numel()))
        return torch.where(flip, random_codes, input_ids)


class ToySampleOptions:
    def configure(self, cfg, training: bool, token_ids: SpatialTokenIds, options) -> None:
        options.image_after_question = extension_value(cfg.model.backbone, "image_position") == "after_question"
        rate = extension_value(cfg.data, "depth_context_noise")
        if training and rate > 0:
            tasks = extension_value(cfg.data, "depth_context_noise_tasks")
            options.input_transforms.append(CodeContextNoise(
                rate, cfg.data.seed, token_ids.code_start, token_ids.code_end,
                None if tasks is None else frozenset(tasks)))


SAMPLE_OPTIONS.register("toy", ToySampleOptions())
