"""What each term of the objective is divided by: the whole optimizer step's item count.

Every term is a mean over the items of the *optimizer step* (all micro-batches of all data-parallel
replicas), not over one micro-batch: text tokens, marker targets, code targets, depth blocks, masks and
target rows (z-loss). A micro-batch therefore contributes ``sum of its items / step count``, and
summing the contributions over micro-batches and ranks gives exactly the step's per-item mean. The
counts are known before the first forward (they depend on the labels only): the parallel strategy
counts the step's micro-batches, sums the counts over the replicas and hands a :class:`StepNormaliser`
to the objective.

DeepSpeed averages what the micro-batches return: it divides each micro-batch loss by the
accumulation steps before backward and averages gradients over the data-parallel ranks. The
normaliser's ``scale`` (accumulation steps x replicas) undoes that, so the gradient is the gradient of
the step's per-item objective, and the loss DeepSpeed reports (the mean of the micro-batch totals) is
exactly that objective.

Text weighting (``objective.text_weighting``): ``token`` (default) gives every answer token the same
weight; ``sample`` weighs a sample's text tokens 1/n (every sample counts the same, whatever its answer
length); ``square`` weighs them 1/sqrt(n), InternVL 2.5's "square averaging" between the two. The text
term is then ``sum(w_t * ce_t) / sum(w_t)`` over the step's text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TERMS = ("text", "marker", "token", "count", "reconstruction", "mask", "z_loss")
TEXT_WEIGHTINGS = ("token", "sample", "square")


def text_row_weights(row_sample: torch.Tensor, is_text: torch.Tensor, num_samples: int,
                     weighting: str) -> torch.Tensor:
    """Per target row: the weight of its text cross-entropy (1 for every row with ``token``)."""
    dtype = torch.float64
    if weighting == "token":
        return torch.ones(row_sample.shape, dtype=dtype, device=row_sample.device)
    per_sample = torch.bincount(row_sample[is_text], minlength=num_samples).to(dtype).clamp_min(1)
    power = 1.0 if weighting == "sample" else 0.5
    return per_sample.pow(-power)[row_sample]


@dataclass
class StepNormaliser:
    """The step's item counts per term (``TERMS`` order; text: the sum of its row weights) and the scale that
    undoes DeepSpeed's averaging over accumulation steps and replicas."""

    counts: torch.Tensor  # [len(TERMS)] float64, summed over the step's micro-batches and replicas
    scale: float = 1.0

    def denominator(self, term: str) -> float:
        """A term with no item anywhere in the step is 0 in every micro-batch; divide by 1 then."""
        value = float(self.counts[TERMS.index(term)])
        return value if value > 0 else 1.0

    @classmethod
    def local(cls, counts: dict[str, float]) -> "StepNormaliser":
        """One micro-batch on its own (tests, evaluation): its own counts, no scaling."""
        return cls(torch.tensor([float(counts[t]) for t in TERMS], dtype=torch.float64), 1.0)
