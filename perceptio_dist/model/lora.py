"""LoRA on the InternVL backbone through peft (``model.lora``), as Sa2VA and LLaVA-AURORA train this model family.

``apply_lora`` injects peft's LoRA layers in place (``peft.inject_adapter_in_model``: module paths stay those of
transformers' InternVL, so the rest of the stack, ZeRO-3 registration and the fused LM-head loss included, sees the
same model). peft then leaves only the adapters trainable in the backbone; on top of them train:

* the spatial-token rows of the input embedding and the LM head. peft's own trainable-token wrapper cannot serve here:
  the fused LM-head loss (losses/) reads the head's weight matrix directly, never its forward, so a wrapper's delta
  rows would be missed. Instead the two weights stay trainable and a gradient hook zeroes every row below the spatial
  tokens, and they go to the optimizer group without weight decay: the other rows never move (Adam's update of a
  zero gradient from zero moments is zero). The cost is the optimizer states of the whole table, partitioned by ZeRO,
  which the planner counts;
* the projector (``lora.train_projector``);
* outside the backbone, untouched by this: the SAM2 mask decoder and prompt encoder and the [SEG] MLP.

``merge_lora`` folds the adapters into the base weights and removes peft's layers (what ``perceptio-export``
writes); ``adapter_state`` gives the adapter in peft's format (``perceptio-export --adapter``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import LoraConfig

ROW_MASKED = "_perceptio_trains_rows_from"  # attribute on a weight whose rows below it never train


def target_pattern(cfg: LoraConfig) -> str:
    """peft's target_modules as a regular expression (full match on the module name inside the backbone)."""
    parts = "|".join(re.escape(p) for p in cfg.apply_to)
    names = "|".join(re.escape(n) for n in cfg.target_modules)
    return rf"model\.({parts})\..*\.({names})"


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_pattern(cfg),
                          bias="none")


def apply_lora(backbone: nn.Module, cfg: LoraConfig, first_spatial_row: int) -> int:
    """Inject the adapters into ``backbone`` in place and set what trains; returns the number of adapted layers."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    inject_adapter_in_model(peft_config(cfg), backbone)
    adapted = sum(isinstance(m, BaseTunerLayer) for m in backbone.modules())
    if not adapted:
        raise ValueError(f"model.lora matched no linear layer: target_modules {cfg.target_modules} in {cfg.apply_to}")
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    if cfg.train_projector:
        backbone.model.multi_modal_projector.requires_grad_(True)
    for weight in {id(w): w for w in (backbone.get_input_embeddings().weight, backbone.lm_head.weight)}.values():
        train_rows_from(weight, first_spatial_row)
    return adapted


def train_rows_from(weight: nn.Parameter, first_row: int) -> None:
    """Make ``weight`` trainable in its rows from ``first_row`` on only (a gradient hook zeroes the others)."""
    weight.requires_grad_(True)
    setattr(weight, ROW_MASKED, first_row)

    def keep_rows(grad: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(grad.shape[0], device=grad.device)[:, None] >= first_row
        return grad * keep.to(grad.dtype)

    weight.register_hook(keep_rows)


def merge_lora(backbone: nn.Module) -> int:
    """Fold every adapter into its base layer and put the base layer back in its place; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, module.get_base_layer())
            merged += 1
    return merged


def adapter_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's format (the keys ``PeftModel.from_pretrained`` reads)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone)
