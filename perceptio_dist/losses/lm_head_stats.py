"""LM-head statistics: everything the token-level loss terms need from the logits.

For P selected positions with hidden states ``H`` [P, d], the LM-head weight ``W`` [V, d] and
the targets ``y`` [P], the objective needs only

* ``lse``          [P]     log-sum-exp over the full vocabulary,
* ``target_logit`` [P]     the logit of the target token,
* ``code_logits``  [P, K]  the logits of the K depth codes (ids ``code_start .. code_start+K-1``).

Every term (text, marker, token, count, the soft-merge probabilities, z-loss) is a function of
these, so a back end only has to produce them; the full [P, V] logit matrix need not exist.
This file holds the reference back end: it does build the logits, in fp32, and is the ground
truth the fused back ends are compared against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class LMHeadStatistics(NamedTuple):
    lse: torch.Tensor  # [P], fp32 (fp64 for fp64 inputs)
    target_logit: torch.Tensor  # [P]
    code_logits: torch.Tensor  # [P, K]


def reference_lm_head_statistics(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, code_start: int, num_codes: int
) -> LMHeadStatistics:
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; fp64 stays fp64 (gradcheck)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    code_logits = logits[:, code_start : code_start + num_codes]
    return LMHeadStatistics(lse, target_logit, code_logits)


class LMHeadStatisticsModule(nn.Module):
    """Wraps a back end in a module of its own.

    Under ZeRO-3 the LM-head weight is registered as an external parameter of this module
    (``deepspeed.zero.register_external_parameter``), so DeepSpeed gathers the full weight for
    exactly this forward and its backward, and the weight's gradient reduction hooks fire.
    """

    def __init__(self, code_start: int, num_codes: int, implementation: str = "reference"):
        super().__init__()
        if implementation not in ("reference", "auto"):
            raise ValueError(f"unknown LM-head statistics implementation '{implementation}'")
        self.code_start, self.num_codes = code_start, num_codes
        self.implementation = "reference"

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> LMHeadStatistics:
        return reference_lm_head_statistics(hidden, weight, targets, self.code_start, self.num_codes)
