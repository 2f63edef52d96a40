"""One training sample and the collated batch the model and objective consume.

Per-sample spatial targets are aligned with the spatial tokens in the conversation:
``seg_masks[i]`` belongs to the i-th ``[SEG]`` of the sample, ``teacher_depth[j]`` to its j-th
depth block. Collation keeps that order (row-major), which is how the objective reads them.

A batch is either padded (``collate``: one row per sample) or packed (data/packing.py: several samples per
row, ``position_ids`` restarting at each sample). ``sample_index`` names every token's sample in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..losses.objective import IGNORE_INDEX, PerceptioObjective


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, IGNORE_INDEX outside the assistant turn
    pixel_values: torch.Tensor  # [tiles, 3, tile, tile] InternVL-normalised
    sam_image: torch.Tensor  # [3, S, S] SAM2-normalised whole image
    seg_masks: torch.Tensor  # [num_seg, S, S] float {0, 1}
    teacher_depth: torch.Tensor  # [num_depth_blocks, 1, D, D] normalised inverse depth
    has_teacher_depth: torch.Tensor  # [num_depth_blocks] bool


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor  # [sum tiles, 3, tile, tile]
    sam_images: torch.Tensor  # [B, 3, S, S]
    seg_masks: torch.Tensor  # [total seg, S, S]
    teacher_depth: torch.Tensor  # [total blocks, 1, D, D]
    has_teacher_depth: torch.Tensor  # [total blocks]
    sample_index: torch.Tensor  # [B, T] the sample (index into sam_images) of each token; -1: padding
    position_ids: torch.Tensor | None = None  # [B, T] packed batches only: positions restarting at every sample
    keys: tuple[str, ...] = field(default=())  # sample keys, for tracing and resume checks

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "keys"]

    def to(self, device: torch.device | str) -> "Batch":
        moved = {name: getattr(self, name) for name in self._tensor_fields()}
        return Batch(**{k: v.to(device) if v is not None else None for k, v in moved.items()}, keys=self.keys)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The model inputs (every tensor field; position_ids is None unless packed)."""
        return {name: getattr(self, name) for name in self._tensor_fields()}

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_tokens(self) -> int:
        """Real tokens (not padding)."""
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """The rows whose LM-head logits the loss computes (the objective's target positions)."""
        return int(PerceptioObjective.target_positions(self.labels, self.sample_index).sum())

    @property
    def num_samples(self) -> int:
        return int(self.sam_images.shape[0])

    @property
    def sample_lengths(self) -> list[int]:
        """Tokens of each sample, in sample order."""
        real = self.sample_index[self.sample_index >= 0]
        return torch.bincount(real, minlength=self.num_samples).tolist()

    @property
    def padding_fraction(self) -> float:
        """Share of the batch tensor's positions that hold no token of a sample."""
        return 1.0 - self.num_tokens / self.input_ids.numel()


def collate(samples: list[Sample], pad_token_id: int, keys: list[str] | tuple[str, ...] = ()) -> Batch:
    """Right-pad to the longest sample; concatenate tiles and spatial targets in sample order."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    length = max(s.input_ids.numel() for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    sample_index = torch.full((b, length), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s.input_ids.numel()
        input_ids[i, :n] = s.input_ids
        labels[i, :n] = s.labels
        attention_mask[i, :n] = 1
        sample_index[i, :n] = i
    return assemble(samples, input_ids, attention_mask, labels, sample_index, keys=tuple(keys))


def assemble(ordered: list[Sample], input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             sample_index: torch.Tensor, position_ids: torch.Tensor | None = None,
             keys: tuple[str, ...] = ()) -> Batch:
    """A batch from its token tensors and the samples in the order their tokens appear (row-major): tiles, SAM2
    images and spatial targets are concatenated in that order."""
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=torch.cat([s.pixel_values for s in ordered]),
        sam_images=torch.stack([s.sam_image for s in ordered]),
        seg_masks=torch.cat([s.seg_masks for s in ordered]),
        teacher_depth=torch.cat([s.teacher_depth for s in ordered]),
        has_teacher_depth=torch.cat([s.has_teacher_depth for s in ordered]),
        sample_index=sample_index,
        position_ids=position_ids,
        keys=keys,
    )
