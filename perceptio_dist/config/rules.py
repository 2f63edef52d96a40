"""The rules that join sections of different components, each a small named function of a whole
training config (config/training.py's ``PerceptioConfig``, not imported here: it imports this module).

A section's own rules live with it (``check`` in model/, data/, losses/, train/, parallel/ config.py); a rule here
reads two or more components, so it has no one home among them. :func:`config.training.validate` runs them in
order after every section passed its own checks.
"""

from __future__ import annotations

from typing import Any, Callable

from .fields import config_error


def curriculum_ends_before_training(cfg: Any) -> None:
    previous, max_steps = 0, cfg.train.max_steps
    for i, phase in enumerate(cfg.data.curriculum):
        if not previous < phase.until_step < max_steps:
            raise config_error(f"data.curriculum[{i}].until_step",
                               f"{phase.until_step} must lie after the previous phase's end ({previous}) and before "
                               f"train.max_steps={max_steps}, or data.task_weights would never be used.")
        previous = phase.until_step


def lora_trains_without_a_pipeline(cfg: Any) -> None:
    if cfg.model.lora.rank and cfg.parallel.mode == "pipeline":
        raise config_error("model.lora.rank", "LoRA runs in parallel.mode=zero (ZeRO-2 or ZeRO-3); the pipeline's "
                           "stage modules are not built for adapters. Set parallel.mode=zero, or model.lora.rank=0.")


def packing_trains_without_a_pipeline(cfg: Any) -> None:
    if cfg.data.packing and cfg.parallel.mode == "pipeline":
        raise config_error("data.packing", "the pipeline (parallel.mode=pipeline) does not pack: its stages rebuild a "
                           "padded causal mask from the attention mask, which cannot keep packed samples apart. Set "
                           "data.packing=false, or train with parallel.mode=zero.")


def tensor_parallelism_divides_the_language_model(cfg: Any) -> None:
    tp_size, text = cfg.parallel.tp_size, cfg.model.backbone.text
    if tp_size <= 1:
        return
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(text, name) % tp_size:
            raise config_error("parallel.tp_size", f"{tp_size} does not divide model.backbone.text.{name}="
                               f"{getattr(text, name)}: every rank needs whole heads and an equal share of the MLP.")
    if cfg.model.lora.rank:
        raise config_error("parallel.tp_size", "LoRA and tensor parallelism together are not supported (AutoTP shards "
                           "the base linear layers peft wraps). Use ZeRO-2/3 without tensor parallelism for LoRA.")


def pipeline_stages_fit_the_decoder(cfg: Any) -> None:
    par, num_layers = cfg.parallel, cfg.model.backbone.text.num_layers
    if par.mode != "pipeline":
        return
    if par.pp_stages > num_layers + 1:
        raise config_error("parallel.pp_stages", f"{par.pp_stages} stages but only {num_layers} decoder layers: every "
                           "stage between the first and the last needs at least one.")
    counts = par.pp_layers_per_stage
    if counts is None:
        return
    if len(counts) != par.pp_stages or sum(counts) != num_layers or any(c < 0 for c in counts):
        raise config_error("parallel.pp_layers_per_stage", f"{counts} must have parallel.pp_stages={par.pp_stages} "
                           f"non-negative entries summing to model.backbone.text.num_layers={num_layers}.")
    if any(c == 0 for c in counts[1:-1]):
        raise config_error("parallel.pp_layers_per_stage", f"{counts}: a middle stage with no decoder layer has "
                           "nothing to run.")


RULES: tuple[Callable[[Any], None], ...] = (
    curriculum_ends_before_training,
    lora_trains_without_a_pipeline,
    packing_trains_without_a_pipeline,
    tensor_parallelism_divides_the_language_model,
    pipeline_stages_fit_the_decoder,
)
