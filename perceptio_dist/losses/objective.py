"""The composite Perceptio objective (DESIGN.md section 2). Definitions, all ours:

Let labels be shifted so that position t predicts y_t = labels[t + 1]; only positions with a
target (y_t != -100) take part. With s_t = LM-head logits at t (full vocabulary V), C the K
depth-code ids, lse_t = logsumexp_V s_t and clse_t = logsumexp_C s_t:

* text      mean over answer tokens that are not spatial of  lse_t - s_t[y_t]
* marker    mean over targets [SEG], <DEPTH_START>, <DEPTH_END> of  lse_t - s_t[y_t]
            (DESIGN names only the depth markers; [SEG] is scored here too, or nothing would
            teach the model to emit it)
* token     mean over <DEPTH_k> targets of  clse_t - s_t[y_t]      (softmax restricted to C)
* count     mean over depth blocks of  |E_b - N| / N, where E_b = sum over the block's predicted
            span (the N positions predicting codes and the one predicting <DEPTH_END>) of the
            probability mass on C, exp(clse_t - lse_t): the expected number of depth tokens.
* reconstruction  mean over blocks of  mean |D_b - T_b|: D_b = VQ-VAE soft_decode of the
            restricted softmax p_t = softmax_C s_t at the block's N code positions (soft merge:
            sum_k p_tk * codebook[k] per cell, through the frozen decoder); T_b = the teacher depth
            map, or the decode of the target codes when the sample stores no teacher map.
* mask      mean over [SEG] of  bce_weight * BCE + dice_weight * Dice (losses/mask_loss.py).
* z_loss    optional, mean over all target positions of lse_t^2.

total = sum of weight * term. A term with nothing to score is 0 (still attached to the graph).
The VQ-VAE decoder runs exactly once per call and the mask decoder once per forward, also on
ranks whose batch has no depth block or no [SEG] (ZeRO-3 rule), on inputs multiplied by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ObjectiveConfig
from ..model.spatial_tokens import SpatialTokenIds
from .lm_head_stats import LMHeadStatistics
from .mask_loss import mask_loss

IGNORE_INDEX = -100
TERMS = ("text", "marker", "token", "count", "reconstruction", "mask", "z_loss")


@dataclass
class ObjectiveOutput:
    total: torch.Tensor  # scalar with graph
    terms: dict[str, torch.Tensor]  # unweighted, detached scalars
    counts: dict[str, int]  # how many positions / blocks / masks each term averaged over


@dataclass
class DepthBlocks:
    """Where the depth blocks sit among the selected (target) positions."""

    code_positions: torch.Tensor  # [nb, N] indices into the selected positions
    end_positions: torch.Tensor  # [nb]

    @property
    def count(self) -> int:
        return int(self.end_positions.numel())


def find_depth_blocks(targets: torch.Tensor, ids: SpatialTokenIds) -> DepthBlocks:
    """Locate ``<DEPTH_START> N codes <DEPTH_END>`` runs in the selected targets (row-major order).

    A block's code and end targets are consecutive selected positions: they are all in one
    assistant turn, which is wholly a target. A malformed block is a data error.
    """
    n = ids.num_depth_tokens
    starts = (targets == ids.depth_start).nonzero(as_tuple=True)[0]
    offsets = torch.arange(1, n + 1, device=targets.device)
    code_positions = starts[:, None] + offsets[None]
    end_positions = starts + n + 1
    if starts.numel():
        if int(end_positions.max()) >= targets.numel():
            raise ValueError("a depth block runs past the end of the targets: expected N codes and <DEPTH_END>")
        codes = targets[code_positions]
        if not bool(((codes >= ids.code_start) & (codes < ids.code_end)).all()):
            raise ValueError(f"a depth block does not hold exactly N={n} depth codes after <DEPTH_START>")
        if not bool((targets[end_positions] == ids.depth_end).all()):
            raise ValueError(f"a depth block is not closed by <DEPTH_END> after N={n} codes")
    if int((targets == ids.depth_end).sum()) != starts.numel():
        raise ValueError("<DEPTH_END> without a matching <DEPTH_START>")
    return DepthBlocks(code_positions, end_positions)


def _safe_mean(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean, or an exact 0 attached to ``anchor``'s graph when there is nothing to average."""
    if values.numel() == 0:
        return anchor.sum() * 0.0
    return values.mean()


class PerceptioObjective:
    def __init__(self, cfg: ObjectiveConfig, ids: SpatialTokenIds):
        self.cfg = cfg
        self.ids = ids
        self.weights = {
            "text": cfg.text_weight,
            "marker": cfg.marker_weight,
            "token": cfg.token_weight,
            "count": cfg.count_weight,
            "reconstruction": cfg.reconstruction_weight,
            "mask": cfg.mask_weight,
            "z_loss": cfg.z_loss_weight,
        }

    def select_targets(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [P, d] of the positions that predict a target, and those targets [P]."""
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        return hidden[:, :-1][keep], shifted[keep]

    def __call__(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        stats_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], LMHeadStatistics],
        soft_decode: Callable[[torch.Tensor], torch.Tensor],
        mask_logits: torch.Tensor,
        num_seg: int,
        seg_masks: torch.Tensor,
        teacher_depth: torch.Tensor,
        has_teacher_depth: torch.Tensor,
    ) -> ObjectiveOutput:
        ids = self.ids
        h_sel, targets = self.select_targets(hidden, labels)
        stats = stats_fn(h_sel, lm_head_weight, targets)
        anchor = stats.code_logits  # any graph-attached tensor, for exact zeros
        if anchor.numel() == 0:
            anchor = hidden
        ce_full = stats.lse - stats.target_logit
        is_code = (targets >= ids.code_start) & (targets < ids.code_end)
        is_marker = (targets == ids.seg) | (targets == ids.depth_start) | (targets == ids.depth_end)
        is_text = ~(is_code | is_marker)
        code_lse = torch.logsumexp(stats.code_logits, dim=-1)

        terms: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        terms["text"] = _safe_mean(ce_full[is_text], anchor)
        terms["marker"] = _safe_mean(ce_full[is_marker], anchor)
        terms["token"] = _safe_mean((code_lse - stats.target_logit)[is_code], anchor)
        counts.update(text=int(is_text.sum()), marker=int(is_marker.sum()), token=int(is_code.sum()))

        blocks = find_depth_blocks(targets, ids)
        terms["count"], terms["reconstruction"] = self._depth_terms(
            stats, code_lse, targets, blocks, soft_decode, teacher_depth, has_teacher_depth, anchor
        )
        counts.update(count=blocks.count, reconstruction=blocks.count)

        if num_seg:
            if seg_masks.shape[0] != num_seg:
                raise ValueError(f"{num_seg} [SEG] tokens but {seg_masks.shape[0]} mask targets in the batch")
            terms["mask"] = mask_loss(
                mask_logits, seg_masks, self.cfg.mask_bce_weight, self.cfg.mask_dice_weight, self.cfg.mask_point_samples
            )
        else:
            terms["mask"] = mask_logits.sum() * 0.0
        counts["mask"] = num_seg

        terms["z_loss"] = _safe_mean(stats.lse.pow(2), anchor)
        counts["z_loss"] = int(targets.numel())

        total = sum(self.weights[name] * terms[name] for name in TERMS)
        return ObjectiveOutput(total=total, terms={k: v.detach() for k, v in terms.items()}, counts=counts)

    def _depth_terms(self, stats, code_lse, targets, blocks, soft_decode, teacher_depth, has_teacher, anchor):
        ids, n = self.ids, self.ids.num_depth_tokens
        if blocks.count == 0:
            # One dummy soft decode keeps the VQ-VAE decoder's gathers in step with other ranks.
            probs = torch.full((1, n, ids.num_codes), 1.0 / ids.num_codes, device=anchor.device)
            depth = soft_decode(probs + 0.0 * anchor.float().sum())
            zero = depth.float().sum() * 0.0
            return zero, zero
        code_mass = torch.exp(code_lse - stats.lse)  # probability of "some depth code" at each position
        expected = code_mass[blocks.code_positions].sum(-1) + code_mass[blocks.end_positions]
        count = ((expected - n).abs() / n).mean()

        probs = F.softmax(stats.code_logits[blocks.code_positions], dim=-1)  # [nb, N, K]
        if teacher_depth.shape[0] != blocks.count:
            raise ValueError(f"{blocks.count} depth blocks but {teacher_depth.shape[0]} depth targets in the batch")
        need_codes = ~has_teacher.bool()
        if bool(need_codes.any()):
            # Decode the target codes in the same decoder call (one-hot rows), so it runs once per step.
            target_codes = targets[blocks.code_positions[need_codes]] - ids.code_start
            onehot = F.one_hot(target_codes, ids.num_codes).to(probs.dtype)
            decoded = soft_decode(torch.cat([probs, onehot], dim=0))
            pred, from_codes = decoded[: blocks.count], decoded[blocks.count:].detach()
            target = teacher_depth.to(pred.dtype).clone()
            target[need_codes] = from_codes
        else:
            pred = soft_decode(probs)
            target = teacher_depth.to(pred.dtype)
        dtype = torch.promote_types(pred.dtype, torch.float32)
        reconstruction = (pred.to(dtype) - target.to(dtype)).abs().flatten(1).mean(-1).mean()
        return count, reconstruction
