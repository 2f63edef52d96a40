"""The DeepSpeed config of a run: a JSON template for ZeRO tuning plus values derived from our config.

Batch sizes, precision, gradient clipping and the ZeRO stage have one source of truth, the
recipe. The template may leave them out or write "auto"; a concrete value that contradicts
the recipe is a config error. The optimizer and scheduler are ours (torch AdamW, warmup +
cosine), so the template must not define them. Bucket sizes written "auto" are derived from
the LLM width as transformers' Trainer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..config.training import PerceptioConfig

AUTO = "auto"


def _auto_zero_values(hidden: int) -> dict[str, float]:
    return {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }


def _merge(template: dict, key: str, value: Any, source: str) -> None:
    if key in template and template[key] != AUTO and template[key] != value:
        raise ConfigError(
            f"Config error at 'parallel.deepspeed_config': {source} sets '{key}' to {template[key]!r} but the recipe "
            f"implies {value!r}. Remove it from the JSON (or write \"auto\") and set it in the recipe."
        )
    template[key] = value


def build_deepspeed_config(cfg: PerceptioConfig, world_size: int) -> dict:
    template: dict = {}
    source = "the DeepSpeed JSON"
    if cfg.parallel.deepspeed_config:
        path = Path(cfg.parallel.deepspeed_config)  # resolved when the config was loaded
        source = str(path)
        try:
            template = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"Config error at 'parallel.deepspeed_config': cannot read {path}: {exc}") from None
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in template:
            raise ConfigError(
                f"Config error at 'parallel.deepspeed_config': {source} defines '{forbidden}'; optimizer and schedule "
                "come from the recipe's train section (torch AdamW, warmup + cosine)."
            )
    t = cfg.train
    _merge(template, "train_micro_batch_size_per_gpu", t.micro_batch_size, source)
    _merge(template, "gradient_accumulation_steps", t.grad_accum_steps, source)
    replicas = cfg.parallel.layout(world_size).replicas
    # DeepSpeed checks train_batch_size against its world size before it builds the tensor-parallel mesh, so with
    # tensor parallelism it counts every rank (its gradients are still averaged over the data-parallel group only).
    counted = replicas * cfg.parallel.tp_size
    _merge(template, "train_batch_size", t.micro_batch_size * t.grad_accum_steps * counted, source)
    _merge(template, "gradient_clipping", t.grad_clip, source)
    bf16 = dict(template.get("bf16", {}))
    _merge(bf16, "enabled", t.precision == "bf16", f"{source} (bf16)")
    template["bf16"] = bf16
    fp16 = dict(template.get("fp16", {}))
    if fp16.get("enabled") not in (None, False, AUTO):
        raise ConfigError(f"Config error at 'parallel.deepspeed_config': {source} enables fp16; use train.precision=bf16.")
    template["fp16"] = {**fp16, "enabled": False}
    zero = dict(template.get("zero_optimization", {}))
    _merge(zero, "stage", cfg.parallel.zero_stage, f"{source} (zero_optimization)")
    for key, value in _auto_zero_values(cfg.model.backbone.text.hidden_size).items():
        if zero.get(key) == AUTO:
            zero[key] = value
    if zero.get("stage3_module_granularity_threshold", 0) not in (0, None):
        # Measured on the tiny model at 1,000 / 3,000 / 14,000 (README, "The stack's own cost"): the first backward
        # fails inside DeepSpeed, a raw traceback far from the JSON line that caused it.
        raise ConfigError(f"Config error at 'parallel.deepspeed_config': {source} sets "
                          "zero_optimization.stage3_module_granularity_threshold. With it DeepSpeed fetches small "
                          "modules (SAM2's head, the vision tower, the VQ-VAE) as leaf units and releases their "
                          "parameters before this model's backward needs them: the first step fails. Remove the key.")
    template["zero_optimization"] = zero
    if cfg.parallel.mode == "pipeline":
        # No tensor parallelism here, so nothing to partition across a slice group.
        pipe = dict(template.get("pipeline", {}))
        pipe.setdefault("pipe_partitioned", False)
        pipe.setdefault("grad_partitioned", False)
        if pipe.get("activation_checkpoint_interval", 0):
            raise ConfigError(f"Config error at 'parallel.deepspeed_config': {source} sets "
                              "pipeline.activation_checkpoint_interval; use train.activation_checkpointing=true "
                              "(every decoder and vision layer recomputes itself, on every stage).")
        template["pipeline"] = pipe
    elif "pipeline" in template:
        raise ConfigError(f"Config error at 'parallel.deepspeed_config': {source} has a 'pipeline' section but "
                          "parallel.mode is 'zero'.")
    if cfg.parallel.tp_size > 1:
        if "tensor_parallel" in template:
            raise ConfigError(f"Config error at 'parallel.deepspeed_config': {source} has a 'tensor_parallel' section; "
                              "set parallel.tp_size in the recipe instead.")
        template["tensor_parallel"] = llm_tensor_parallel(cfg.parallel.tp_size)
    template.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW is fine with ZeRO
    template.setdefault("steps_per_print", 2**31 - 1)  # we log ourselves
    template.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(template) if v == AUTO]
    if leftover:
        raise ConfigError(f"Config error at 'parallel.deepspeed_config': no rule fills \"auto\" for {', '.join(leftover)}.")
    return template


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def llm_tensor_parallel(tp_size: int) -> dict:
    """DeepSpeed AutoTP training for the language model's decoder layers only. DeepSpeed's default specs would shard
    every linear layer it finds, the InternViT and SAM2 Hiera attentions included, whose head reshapes then break
    (measured: a shape error in the first forward); so the layer specs name the LLM's projections alone."""
    layer = r".*language_model\.layers\.\d+\."
    return {"autotp_size": tp_size, "partition_config": {"use_default_specs": False, "layer_specs": [
        {"patterns": [layer + r"self_attn\.[qkv]_proj\.weight$", layer + r"mlp\.(gate|up)_proj\.weight$"],
         "partition_type": "column"},
        {"patterns": [layer + r"self_attn\.o_proj\.weight$", layer + r"mlp\.down_proj\.weight$"],
         "partition_type": "row"},
    ]}}
