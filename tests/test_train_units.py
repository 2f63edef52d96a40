"""Trainer building blocks without processes: DeepSpeed config, optimizer groups, schedule, FLOPs, metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from torch import nn

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.train.config import LoggingConfig
from perceptio_dist.parallel.deepspeed_config import build_deepspeed_config
from perceptio_dist.train.flops import FlopsModel, flops_model_for
from perceptio_dist.train.metrics import MetricsLogger, wandb_mode
from perceptio_dist.train.optim import build_optimizer, parameter_groups, warmup_cosine


def test_deepspeed_config_takes_batch_precision_and_clipping_from_the_recipe():
    cfg = load_config("tiny_cpu", ["train.grad_accum_steps=3", "train.precision=bf16", "train.grad_clip=0.5"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # from ds_configs/zero3_tiny.json


def test_deepspeed_auto_values_follow_the_llm_width():
    cfg = load_config("tiny_cpu", ["parallel.deepspeed_config=ds_configs/zero3.json"])
    zero = build_deepspeed_config(cfg, 2)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640


@pytest.mark.parametrize(
    "template, message",
    [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
        ({"zero_optimization": {"stage": 2}}, "'stage'"),
        ({"optimizer": {"type": "Adam"}}, "defines 'optimizer'"),
        ({"fp16": {"enabled": True}}, "fp16"),
        ({"zero_optimization": {"allgather_bucket_size": "auto"}}, "no rule fills"),
        ({"zero_optimization": {"stage3_module_granularity_threshold": 3000}}, "releases their parameters"),
    ],
)
def test_deepspeed_json_contradicting_the_recipe_is_refused(tmp_path, template, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(template))
    cfg = load_config("tiny_cpu", [f"parallel.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(cfg, 1)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 4, 100, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(52, 4, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 4, 100, 0.1) == pytest.approx(0.1)
    cfg = load_config("tiny_cpu").train
    model = nn.Linear(3, 3)
    optimizer, scheduler = build_optimizer(model, cfg)
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert max(lrs) == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * (cfg.max_steps - 1 - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)))))


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = nn.ModuleDict({"embed_tokens": nn.Embedding(5, 4), "proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    model["frozen"] = nn.Linear(4, 4)
    model["frozen"].requires_grad_(False)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["params"] == [model["proj"].weight] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(model["embed_tokens"].weight), id(model["proj"].bias),
                                                    id(model["norm"].weight), id(model["norm"].bias)}


def test_step_flops_by_hand():
    fm = FlopsModel(llm_params=100, llm_layers=2, llm_hidden=8, lm_head_params=30, vision_params=10, vision_layers=1,
                    vision_hidden=4, patches_per_tile=16, projector_params=5, image_tokens_per_tile=4)
    # Everything trained: decoder 6 N per token, attention, the LM head on the 4 target rows only, the tower and
    # the projector forward and backward (3 passes).
    decoder, attention, head = 6 * 100 * (3 + 5), 12 * 2 * 8 * (9 + 25), 6 * 30 * 4
    tower_forward, projector_forward = 2 * (2 * 10 * 16 + 4 * 1 * 4 * 256), 2 * 5 * 4 * 2
    assert fm.step_flops([3, 5], num_tiles=2, target_rows=4) == (decoder + attention + head + 3 * tower_forward
                                                                 + 3 * projector_forward)
    assert fm.step_flops([3, 5], num_tiles=2) == fm.step_flops([3, 5], num_tiles=2, target_rows=8)  # every token
    # A frozen tower runs forward only; the projector in front of it then needs no input gradient (2 passes).
    frozen_tower = dataclasses.replace(fm, trains_vision=False)
    assert frozen_tower.step_flops([3, 5], 2, 4) == decoder + attention + head + tower_forward + 2 * projector_forward
    # LoRA: 10 of the decoder's 100 weights trained: forward and input gradient for all, weight gradient for 10.
    lora = dataclasses.replace(frozen_tower, trains_projector=False, llm_trained_params=10)
    assert lora.step_flops([3, 5], 2, 4) == ((4 * 100 + 2 * 10) * 8 + attention + head + tower_forward
                                             + projector_forward)


def test_flops_model_reads_the_perceptio_sizes(tiny_cfg, tiny_tokenizer):
    from perceptio_dist.model.perceptio import build_perceptio

    model = build_perceptio(tiny_cfg.model, tiny_tokenizer)
    fm = flops_model_for(model)
    layers = sum(p.numel() for p in model.backbone.model.language_model.layers.parameters())
    assert fm.llm_params == layers and fm.lm_head_params == model.lm_head.weight.numel()
    assert fm.patches_per_tile == 64 and fm.image_tokens_per_tile == 16
    assert fm.trains_vision and fm.trains_projector and fm.llm_trained_params == layers
    model.backbone.model.vision_tower.requires_grad_(False)
    assert not flops_model_for(model).trains_vision


def test_metrics_jsonl_and_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online" and wandb_mode("disabled") == "disabled"
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb="disabled"), {}, enabled=True)
    logger.log(1, {"loss": 2.5, "loss/mask": float("nan"), "mfu": None})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5, "loss/mask": None,
                                                                     "mfu": None}
    silent = MetricsLogger(tmp_path / "other", LoggingConfig(wandb="offline"), {}, enabled=False)
    silent.log(1, {"loss": 1.0})  # other ranks write nothing
    assert not (tmp_path / "other").exists()
