"""ZeRO mode: the module DeepSpeed wraps, and the ZeRO-3 helpers (partitioned construction, external
parameters, partition inspection, the Adam step after a universal-checkpoint load)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..losses.lm_head_module import LMHeadTermsModule
from ..losses.objective import PerceptioObjective, objective_outputs
from ..model.perceptio import PerceptioModel


class PerceptioTrainingModule(nn.Module):
    """Model forward and the whole objective in one module, so the loss runs inside the engine's forward
    (ZeRO-3 gathers and gradient hooks fire for every parameter involved)."""

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
        sample_index: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, the unweighted terms in ``TERMS`` order (detached), how many items each term averaged).
        ``position_ids``: a packed batch (data/packing.py)."""
        out = self.model(input_ids, attention_mask, pixel_values, sam_images, sample_index, position_ids)
        return objective_outputs(self.objective, self.lm_head_terms, out.hidden_states, self.model.lm_head.weight,
                                 self.model.depth_vqvae.soft_decode, out.mask_logits, out.num_seg, labels, seg_masks,
                                 teacher_depth, has_teacher_depth, sample_index)


@contextlib.contextmanager
def partitioned_construction(ds_config: dict, enabled: bool) -> Iterator[None]:
    """Activate transformers' DeepSpeed integration so HF models are created (and loaded) already
    partitioned under ZeRO-3, and ``resize_token_embeddings`` gathers what it touches.

    The integration is global state in transformers; it is switched off again on exit so later
    model builds in the same process are not affected.
    """
    if not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: keep this one alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config


def register_external_parameters(pairs: list[tuple[nn.Module, nn.Parameter]]) -> None:
    """Let DeepSpeed gather ``param`` around ``module``'s forward and backward although ``module`` does not own it."""
    import deepspeed

    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)


@dataclass
class PartitionInfo:
    name: str
    full_numel: int
    local_numel: int
    persistent: bool


def partition_report(module: nn.Module) -> list[PartitionInfo]:
    """How much of each parameter this rank holds (ZeRO-3 parameters only)."""
    out = []
    for name, p in module.named_parameters():
        if not hasattr(p, "ds_tensor"):
            continue
        out.append(PartitionInfo(name, int(p.ds_numel), int(p.ds_tensor.numel()), bool(getattr(p, "ds_persist", False))))
    return out


def is_zero3_parameter(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def inject_optimizer_step(engine, step: int) -> int:
    """Give every Adam state its own step count after a universal-checkpoint load.

    DeepSpeed's ZeRO-3 universal loader hands one and the same ``step`` tensor to the state of every
    parameter group. torch's Adam increments that tensor in place, once per group, so with two groups
    (decay and no decay) the step ran twice as fast after a resume and bias correction drifted (the
    loss moved by ~1% within five steps in the tests). Each state gets a separate tensor here.
    Returns how many states were set.
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    count = 0
    for state in inner.state.values():
        if "exp_avg" in state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            count += 1
    return count
