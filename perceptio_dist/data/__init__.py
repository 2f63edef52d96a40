"""Data: samples, conversations, batch sources. Knows nothing of training or parallelism."""

from __future__ import annotations

from typing import Iterator

from .batch import Batch, Sample, collate
from .sampling import micro_batch_indices


def iterate_micro_batches(
    source, pad_token_id: int, start_step: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int
) -> Iterator[Batch]:
    """This rank's micro-batches from optimizer step ``start_step`` on, in order (step-major)."""
    step = start_step
    while True:
        for micro in range(grad_accum):
            indices = micro_batch_indices(step, micro, rank, world_size, micro_batch_size, grad_accum)
            yield collate([source[i] for i in indices], pad_token_id)
        step += 1


__all__ = ["Batch", "Sample", "collate", "iterate_micro_batches", "micro_batch_indices"]
