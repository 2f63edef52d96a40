"""The module that runs the LM-head back end inside the engine's forward.

Under ZeRO-3 the LM-head weight is registered as an external parameter of this module
(``deepspeed.zero.register_external_parameter``): DeepSpeed gathers the full weight for exactly this
module's forward and backward, and the weight's gradient-reduction hooks fire. (A
``deepspeed.zero.GatheredParameters`` block cannot do this: it re-partitions the weight when the block
ends, before autograd runs backward.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layout import TargetLayout
from .lm_head_terms import LMHeadTerms, LMHeadWeights, lm_head_terms_fn, resolve_implementation

if TYPE_CHECKING:
    from .config import ObjectiveConfig

log = logging.getLogger(__name__)


class LMHeadTermsModule(nn.Module):
    def __init__(self, implementation: str = "auto", chunk_size: int = 1024, device: torch.device | None = None,
                 vocab_size: int | None = None, matmul: str = "fp32"):
        super().__init__()
        if vocab_size is not None:
            check_chunk_size(chunk_size, vocab_size)
        self.implementation = resolve_implementation(implementation, device or torch.device("cpu"))
        self._fn = lm_head_terms_fn(self.implementation, chunk_size, matmul)

    @classmethod
    def from_config(cls, objective: "ObjectiveConfig", device: torch.device,
                    vocab_size: int | None = None) -> "LMHeadTermsModule":
        """The back end the recipe names, resolved for ``device`` (the trainer's, a benchmark's, the GPU check's)."""
        return cls(objective.implementation, objective.chunk_size, device, vocab_size, objective.lm_head_matmul)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, layout: TargetLayout, weights: LMHeadWeights,
                code_start: int, num_codes: int) -> LMHeadTerms:
        return self._fn(hidden, weight, layout, weights, code_start, num_codes)


# A chunk's fp32 logits must stay below 2^31 values: 32-bit indexing (torch kernels, Triton's default) ends there,
# and such a chunk is already 8 GiB, more than the fused loss exists to save.
MAX_CHUNK_LOGITS = 2**31 - 1


def check_chunk_size(chunk_size: int, vocab_size: int) -> None:
    """Refuse a chunk whose rows x vocabulary logits would reach 2^31 values."""
    if chunk_size * vocab_size > MAX_CHUNK_LOGITS:
        from ..config import ConfigError

        largest = MAX_CHUNK_LOGITS // vocab_size
        raise ConfigError(
            f"Config error at 'objective.chunk_size': {chunk_size} rows x a vocabulary of {vocab_size:,} is "
            f"{chunk_size * vocab_size:,} fp32 logits per chunk ({chunk_size * vocab_size * 4 / 2**30:.1f} GiB), at "
            f"or past 2^31 values. Use at most {largest} (1024 to 4096 is usual).")
