"""The module that runs the LM-head back end inside the engine's forward.

Under ZeRO-3 the LM-head weight is registered as an external parameter of this module
(``deepspeed.zero.register_external_parameter``): DeepSpeed gathers the full weight for exactly this
module's forward and backward, and the weight's gradient-reduction hooks fire. (A
``deepspeed.zero.GatheredParameters`` block cannot do this: it re-partitions the weight when the block
ends, before autograd runs backward.)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .layout import TargetLayout
from .lm_head_terms import LMHeadTerms, LMHeadWeights, lm_head_terms_fn, resolve_implementation

log = logging.getLogger(__name__)


class LMHeadTermsModule(nn.Module):
    def __init__(self, implementation: str = "auto", chunk_size: int = 1024, device: torch.device | None = None):
        super().__init__()
        self.implementation = resolve_implementation(implementation, device or torch.device("cpu"))
        self._fn = lm_head_terms_fn(self.implementation, chunk_size)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, layout: TargetLayout, weights: LMHeadWeights,
                code_start: int, num_codes: int) -> LMHeadTerms:
        return self._fn(hidden, weight, layout, weights, code_start, num_codes)
