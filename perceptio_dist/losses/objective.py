"""The composite Perceptio objective (DESIGN.md section 2). Definitions, all ours:

Let labels be shifted so that position t predicts y_t = labels[t + 1]; only positions with a
target (y_t != -100) take part (the "rows"). With s_t = LM-head logits at t (full vocabulary V), C
the K depth-code ids, lse_t = logsumexp_V s_t and clse_t = logsumexp_C s_t:

* text      mean over answer tokens that are not spatial of  lse_t - s_t[y_t]  (weighted per sample
            with objective.text_weighting other than 'token': sum w_t ce_t / sum w_t)
* marker    mean over targets [SEG], <DEPTH_START>, <DEPTH_END> of  lse_t - s_t[y_t]
            (DESIGN names only the depth markers; [SEG] is scored here too, or nothing would
            teach the model to emit it)
* token     mean over <DEPTH_k> targets of  clse_t - s_t[y_t]      (softmax restricted to C)
* count     mean over depth blocks of  1/(N+1) * [ sum over the block's N code rows of -log m_t
            + (-log(1 - m_e)) at the row e predicting <DEPTH_END> ],  m_t = exp(clse_t - lse_t) the
            probability mass on C: a binary cross-entropy "code here / no code here" on each row of
            the block's span. It sees where the block ends: a block shifted by one, ending early or
            late scores higher than the right one (DESIGN's |E_b - N| / N on the summed mass could
            not tell them apart), and its gradient on the logits, k (softmax - softmax_C) with k = 1
            or -m/(1-m), is about 1/sqrt(K) of a cross-entropy's whatever the mass (|E_b - N|'s was
            m ~ K/V of it at initialisation). m saturates at 1 - 1e-4 (lm_head_terms.MAX_LOG_CODE_MASS).
* reconstruction  mean over blocks of  mean |D_b - T_b|: D_b = VQ-VAE soft_decode of the
            restricted softmax p_t = softmax_C s_t at the block's N code rows (soft merge:
            sum_k p_tk * codebook[k] per cell, through the frozen decoder); T_b = the teacher depth
            map, or the decode of the target codes when the sample stores no teacher map.
* mask      mean over [SEG] of  bce_weight * BCE + dice_weight * Dice (losses/mask_loss.py).
* z_loss    optional, mean over all rows of lse_t^2.

"Mean over" is over the whole optimizer step (losses/normalise.py): a micro-batch contributes the sum
of its items divided by the step's count, and the total is scaled so that DeepSpeed's averaging over
accumulation steps and replicas gives the gradient of the step's objective. Without a normaliser a
call is its own step (plain means over its rows).

total = sum of weight * term. A term with nothing to score is 0 (still attached to the graph).

Text, marker, count and z-loss need the full vocabulary and are computed by an LM-head back end
(losses/lm_head_terms.py: reference, fused_torch or fused_triton) that returns them with the K code
logits of the code rows; token and reconstruction are built on those code logits here. The VQ-VAE
decoder runs exactly once per call and the mask decoder once per forward, also on ranks whose batch
has no depth block or no [SEG] (ZeRO-3 rule), on inputs multiplied by zero.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .config import ObjectiveConfig
from ..model.spatial_tokens import SpatialTokenIds
from .layout import IGNORE_INDEX, TargetLayout, build_layout
from .lm_head_terms import LMHeadTerms, LMHeadWeights
from .mask_loss import mask_loss
from .normalise import TERMS, StepNormaliser, text_row_weights

__all__ = ["IGNORE_INDEX", "TERMS", "ObjectiveOutput", "PerceptioObjective", "StepNormaliser", "find_depth_blocks",
           "objective_outputs"]


@dataclass
class ObjectiveOutput:
    total: torch.Tensor  # scalar with graph: normaliser.scale x sum of weight x term
    terms: dict[str, torch.Tensor]  # unweighted, detached: this call's share of each step term (sum / step count)
    counts: dict[str, float]  # this call's items per term (text: the sum of its row weights)


def find_depth_blocks(targets: torch.Tensor, ids: SpatialTokenIds) -> TargetLayout:
    """Validate the depth blocks of a target sequence (raises ValueError on a malformed one)."""
    return build_layout(targets, ids)


class PerceptioObjective:
    def __init__(self, cfg: ObjectiveConfig, ids: SpatialTokenIds):
        self.cfg = cfg
        self.ids = ids
        self._step: StepNormaliser | None = None  # inside normalised_by(); None: each call its own step

    @contextlib.contextmanager
    def normalised_by(self, normaliser: StepNormaliser) -> Iterator[None]:
        """Every call inside divides by the step's item counts (the parallel strategy opens it around a step's
        forwards and backwards, recomputation included); outside, each call is a step of its own."""
        previous, self._step = self._step, normaliser
        try:
            yield
        finally:
            self._step = previous

    def step_counts(self, micro_batches: Iterable, device: torch.device) -> torch.Tensor:
        """The items each term scores over micro-batches ([len(TERMS)] float64), from their labels alone (known
        before any forward): one rank's part of the step normaliser's counts."""
        counts = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        for batch in micro_batches:
            items = self.item_counts(batch.labels, int(batch.seg_masks.shape[0]), batch.sample_index)
            counts += torch.tensor([items[t] for t in TERMS], dtype=torch.float64, device=device)
        return counts

    @staticmethod
    def target_positions(labels: torch.Tensor, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T-1] bool: the positions that predict a target (position t predicts labels[t + 1]). In a packed row
        the last token of a sample never predicts the next sample's first token."""
        keep = labels[:, 1:] != IGNORE_INDEX
        if sample_index is not None:
            keep = keep & (sample_index[:, 1:] == sample_index[:, :-1])
        return keep

    def select_targets(self, hidden: torch.Tensor, labels: torch.Tensor,
                       sample_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [P, d] of the positions that predict a target, and those targets [P]."""
        keep = self.target_positions(labels, sample_index)
        return hidden[:, :-1][keep], labels[:, 1:][keep]

    def target_layout(self, labels: torch.Tensor, sample_index: torch.Tensor | None = None) -> TargetLayout:
        """The rows' categories and blocks, with the text weighting's per-row weights (per sample: a packed row's
        samples are weighted each on its own)."""
        keep = self.target_positions(labels, sample_index)
        shifted = labels[:, 1:]
        layout = build_layout(shifted[keep], self.ids)
        if sample_index is None:
            owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)
            num_samples = labels.shape[0]
        else:
            owner = sample_index[:, :-1]
            num_samples = int(sample_index.max()) + 1
        layout.text_weights = text_row_weights(owner[keep], layout.is_text, num_samples, self.cfg.text_weighting)
        return layout

    def item_counts(self, labels: torch.Tensor, num_masks: int,
                    sample_index: torch.Tensor | None = None) -> dict[str, float]:
        """Items each term scores in a micro-batch, from its labels alone (known before any forward)."""
        return self.item_counts_of(self.target_layout(labels, sample_index), num_masks)

    def __call__(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        lm_terms_fn: Callable[..., LMHeadTerms],
        soft_decode: Callable[[torch.Tensor], torch.Tensor],
        mask_logits: torch.Tensor,
        num_seg: int,
        seg_masks: torch.Tensor,
        teacher_depth: torch.Tensor,
        has_teacher_depth: torch.Tensor,
        sample_index: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """``sample_index`` [B, T]: each token's sample, -1 for padding (None: one sample per row)."""
        ids, cfg = self.ids, self.cfg
        layout = self.target_layout(labels, sample_index)
        h_sel, targets = hidden[:, :-1][self.target_positions(labels, sample_index)], layout.targets
        counts = self.item_counts_of(layout, num_seg)
        norm = self._step or StepNormaliser.local(counts)
        lm_weights = LMHeadWeights(cfg.text_weight, cfg.marker_weight, cfg.count_weight, cfg.z_loss_weight,
                                   norm.denominator("text"), norm.denominator("marker"), norm.denominator("count"),
                                   norm.denominator("z_loss"))
        lm = lm_terms_fn(h_sel, lm_head_weight, layout, lm_weights, ids.code_start, ids.num_codes)
        anchor = lm.code_logits if lm.code_logits.numel() else hidden  # graph-attached, for exact zeros

        terms = {"text": lm.text, "marker": lm.marker, "count": lm.count, "z_loss": lm.z_loss}
        code_targets = targets[layout.code_rows] - ids.code_start
        if code_targets.numel():
            token = (torch.logsumexp(lm.code_logits, -1)
                     - lm.code_logits.gather(1, code_targets[:, None]).squeeze(1)).sum() / norm.denominator("token")
        else:
            token = anchor.sum() * 0.0
        reconstruction = self._reconstruction(lm.code_logits, code_targets, layout, soft_decode, teacher_depth,
                                              has_teacher_depth, anchor) / norm.denominator("reconstruction")
        if num_seg:
            if seg_masks.shape[0] != num_seg:
                raise ValueError(f"{num_seg} [SEG] tokens but {seg_masks.shape[0]} mask targets in the batch")
            mask = mask_loss(mask_logits, seg_masks, cfg.mask_bce_weight, cfg.mask_dice_weight, cfg.mask_point_samples,
                             reduction="sum") / norm.denominator("mask")
        else:
            mask = mask_logits.sum() * 0.0
        total = lm.total + cfg.token_weight * token + cfg.reconstruction_weight * reconstruction + cfg.mask_weight * mask
        total = norm.scale * total
        # Gradient must reach every output of the LM-head module on every rank, also when this batch has no
        # code rows (ZeRO-3 re-gathers a module's parameters once per output that receives gradient).
        total = total + 0.0 * lm.code_logits.sum()
        terms.update(token=token.detach(), reconstruction=reconstruction.detach(), mask=mask.detach())
        return ObjectiveOutput(total=total, terms=terms, counts=counts)

    @staticmethod
    def item_counts_of(layout: TargetLayout, num_masks: int) -> dict[str, float]:
        return {"text": float(layout.text_weights[layout.is_text].sum()), "marker": float(layout.is_marker.sum()),
                "token": float(layout.code_rows.numel()), "count": float(layout.num_blocks),
                "reconstruction": float(layout.num_blocks), "mask": float(num_masks), "z_loss": float(layout.num_rows)}

    def _reconstruction(self, code_logits, code_targets, layout, soft_decode, teacher_depth, has_teacher, anchor):
        ids, n, nb = self.ids, self.ids.num_depth_tokens, layout.num_blocks
        if nb == 0:
            # One dummy soft decode keeps the VQ-VAE decoder's gathers in step with other ranks.
            probs = torch.full((1, n, ids.num_codes), 1.0 / ids.num_codes, device=anchor.device)
            depth = soft_decode(probs + 0.0 * anchor.float().sum())
            return depth.float().sum() * 0.0
        if teacher_depth.shape[0] != nb:
            raise ValueError(f"{nb} depth blocks but {teacher_depth.shape[0]} depth targets in the batch")
        rows = layout.block_code_rows()  # [nb, N] into the code rows
        probs = F.softmax(code_logits[rows], dim=-1)  # [nb, N, K]
        need_codes = ~has_teacher.bool()
        if bool(need_codes.any()):
            # Decode the target codes in the same decoder call (one-hot rows), so it runs once per step.
            onehot = F.one_hot(code_targets[rows[need_codes]], ids.num_codes).to(probs.dtype)
            decoded = soft_decode(torch.cat([probs, onehot], dim=0))
            pred, from_codes = decoded[:nb], decoded[nb:].detach()
            target = teacher_depth.to(pred.dtype).clone()
            target[need_codes] = from_codes
        else:
            pred = soft_decode(probs)
            target = teacher_depth.to(pred.dtype)
        dtype = torch.promote_types(pred.dtype, torch.float32)
        return (pred.to(dtype) - target.to(dtype)).abs().flatten(1).mean(-1).sum()  # per-block means, summed


def objective_outputs(objective: PerceptioObjective, lm_head_terms: Callable, hidden: torch.Tensor,
                      lm_head_weight: torch.Tensor, soft_decode: Callable, mask_logits: torch.Tensor, num_seg: int,
                      labels: torch.Tensor, seg_masks: torch.Tensor, teacher_depth: torch.Tensor,
                      has_teacher_depth: torch.Tensor,
                      sample_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, the unweighted terms in ``TERMS`` order (detached), how many items each term averaged).

    The objective as tensors for an engine to return: shared by the ZeRO module (parallel/zero.py) and the
    last pipeline stage (parallel/pipeline.py).
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
        sample_index=sample_index,
    )
    terms = torch.stack([result.terms[name].float() for name in TERMS])
    counts = torch.tensor([float(result.counts[name]) for name in TERMS], device=terms.device)
    return result.total, terms, counts
