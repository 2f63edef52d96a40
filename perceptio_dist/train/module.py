"""The module DeepSpeed wraps: model forward and the whole objective, so the loss runs inside the
engine's forward (ZeRO-3 gathers and gradient hooks fire for every parameter involved)."""

from __future__ import annotations

import torch
from torch import nn

from ..losses.lm_head_module import LMHeadTermsModule
from ..losses.objective import TERMS, PerceptioObjective
from ..model.perceptio import PerceptioModel


class PerceptioTrainingModule(nn.Module):
    def __init__(self, model: PerceptioModel, objective: PerceptioObjective, lm_head_terms: LMHeadTermsModule):
        super().__init__()
        self.model = model
        self.objective = objective
        self.lm_head_terms = lm_head_terms

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Parameters used by a module that does not own them (for ZeRO-3 registration)."""
        return [(self.lm_head_terms, self.model.lm_head.weight)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor,
        sam_images: torch.Tensor,
        seg_masks: torch.Tensor,
        teacher_depth: torch.Tensor,
        has_teacher_depth: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, the unweighted terms in ``TERMS`` order (detached), how many items each term averaged)."""
        out = self.model(input_ids, attention_mask, pixel_values, sam_images)
        return objective_outputs(self.objective, self.lm_head_terms, out.hidden_states, self.model.lm_head.weight,
                                 self.model.depth_vqvae.soft_decode, out.mask_logits, out.num_seg, labels, seg_masks,
                                 teacher_depth, has_teacher_depth)


def objective_outputs(objective: PerceptioObjective, lm_head_terms: LMHeadTermsModule, hidden: torch.Tensor,
                      lm_head_weight: torch.Tensor, soft_decode, mask_logits: torch.Tensor, num_seg: int,
                      labels: torch.Tensor, seg_masks: torch.Tensor, teacher_depth: torch.Tensor,
                      has_teacher_depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, the unweighted terms in ``TERMS`` order (detached), how many items each term averaged).

    Shared by the ZeRO module above and the last pipeline stage (parallel/pipeline.py).
    """
    result = objective(
        hidden=hidden,
        lm_head_weight=lm_head_weight,
        labels=labels,
        lm_terms_fn=lm_head_terms,
        soft_decode=soft_decode,
        mask_logits=mask_logits,
        num_seg=num_seg,
        seg_masks=seg_masks,
        teacher_depth=teacher_depth,
        has_teacher_depth=has_teacher_depth,
    )
    terms = torch.stack([result.terms[name].float() for name in TERMS])
    counts = torch.tensor([float(result.counts[name]) for name in TERMS], device=terms.device)
    return result.total, terms, counts
