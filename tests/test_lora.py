"""LoRA through peft (model/lora.py): what trains (counted by hand), frozen rows stay put, the merged export gives the
adapter model's logits, a tiny LoRA run learns on 2 ranks under ZeRO-3 and equals 1 rank under ZeRO-2, resumes
exactly, and the planner counts LoRA's trainable states."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.train.checkpoint import tag_for

from .conftest import (NO_TOKENIZER, assert_steps_repeat_bit_for_bit, read_metrics, run_ranks,
                       save_initial_backbone, start_from_checkpoint)

RANK, ALPHA = 4, 8.0
LORA = [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}", "model.lora.dropout=0.0"]


@pytest.fixture(scope="module")
def tiny_lora(tiny_shards):
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer

    cfg = load_config("tiny_cpu", [f"data.shards={tiny_shards}", NO_TOKENIZER, *LORA])
    tokenizer = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    return cfg, tokenizer, build_perceptio(cfg.model, tokenizer, torch.float32, seed=0)


def _lora_params_by_hand(text, layers: int, rank: int) -> int:
    d, inter = text.hidden_size, text.intermediate_size
    kv = text.num_kv_heads * (d // text.num_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]  # q k v o gate up down
    return layers * sum(rank * (a + b) for a, b in shapes)


def test_what_trains_is_counted_by_hand(tiny_lora):
    cfg, tokenizer, model = tiny_lora
    text = cfg.model.backbone.text
    bb = model.backbone
    lora = sum(p.numel() for n, p in bb.named_parameters() if "lora_" in n)
    assert lora == _lora_params_by_hand(text, text.num_layers, RANK) == 2 * 4096  # tiny: 4096 per layer
    vocab = len(tokenizer)
    rows = 2 * vocab * text.hidden_size  # embedding and LM head (untied), trainable as tensors, rows masked
    projector = sum(p.numel() for p in bb.model.multi_modal_projector.parameters())
    seg = sum(p.numel() for p in model.seg_head.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora + rows + projector + seg
    assert seg > 0 and not any(p.requires_grad for p in bb.model.vision_tower.parameters())
    base = [n for n, p in bb.model.language_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert base == ["embed_tokens.weight"]


def test_only_adapters_and_spatial_rows_move(tiny_lora, tiny_cfg):
    from perceptio_dist.data.training_data import build_loader
    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.parallel.zero import PerceptioTrainingModule
    from perceptio_dist.train.optim import build_optimizer

    cfg, tokenizer, _ = tiny_lora
    torch.manual_seed(0)
    model = build_perceptio(cfg.model, tokenizer, torch.float32, seed=0).train()
    module = PerceptioTrainingModule(model, PerceptioObjective(cfg.objective, model.token_ids),
                                     LMHeadTermsModule("fused_torch"))
    train_cfg = dataclasses.replace(cfg.train, weight_decay=0.1, warmup_steps=0, lr=1e-2)
    optimizer, _ = build_optimizer(module, train_cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = iter(build_loader(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0)),
                                tokenizer, model.token_ids, 0, 1))
    for _ in range(3):
        loss, _, _ = module(**next(batches).as_dict())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    base = model.token_ids.first
    assert 0 < base < len(tokenizer)
    for name in ("backbone.model.language_model.embed_tokens.weight", "backbone.lm_head.weight"):
        now = dict(model.named_parameters())[name]
        assert torch.equal(now[:base], before[name][:base]), name  # decay and Adam never touch these rows
        assert not torch.equal(now[base:], before[name][base:]), name
    moved = {name: not torch.equal(p, before[name]) for name, p in model.named_parameters()}
    for name, m in moved.items():
        if "lora_B" in name or "multi_modal_projector" in name:
            assert m, name
        if ("language_model.layers" in name and "lora_" not in name) or "vision_tower" in name:
            assert not m, name
    assert any(m for name, m in moved.items() if "mask_decoder" in name)  # SAM2's decoder trains (some outputs
    # of it, e.g. the unused multimask heads, get no gradient)


def test_merged_model_gives_the_adapter_models_logits(tiny_lora, tiny_cfg):
    from perceptio_dist.data.training_data import build_loader
    from perceptio_dist.model.lora import merge_lora

    cfg, tokenizer, model = tiny_lora
    model = model.eval()
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: zero-initialised B would make the test vacuous
    batch = next(iter(build_loader(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0)),
                                   tokenizer, model.token_ids, 0, 1)))
    with torch.no_grad():
        adapted = model.lm_head(model(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                      batch.sam_images).hidden_states)
        assert merge_lora(model.backbone) == 2 * 7
        merged = model.lm_head(model(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                     batch.sam_images).hidden_states)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert (merged - adapted).abs().max() <= 1e-5 * adapted.abs().max()


def test_lora_config_is_validated():
    for overrides, words in [
        (["model.lora.rank=-1"], "'model.lora.rank'"),
        (["model.lora.rank=4", "model.lora.apply_to=[decoder]"], "'model.lora.apply_to'"),
        (["model.lora.rank=4", "model.lora.dropout=1.0"], "'model.lora.dropout'"),
        (["model.lora.rank=4", "parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.pp_stages=2"],
         "parallel.mode=zero"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
            load_config("tiny_cpu", overrides)


def test_planner_counts_lora_trainable_states():
    from perceptio_dist.plan import model_sizes

    full, lora = model_sizes(load_config("perceptio_8b", [])), model_sizes(load_config("perceptio_8b_lora", []))
    text = load_config("perceptio_8b", []).model.backbone.text
    adapters = _lora_params_by_hand(text, text.num_layers, 128)
    assert adapters == 32 * 128 * 81920  # 335.5M
    blocks = {b.name: b for b in full.blocks}
    frozen_by_lora = (blocks["vision_tower"].trainable + sum(b.trainable for n, b in blocks.items()
                                                             if n.startswith("decoder.")) + text.hidden_size)
    assert lora.trainable == full.trainable - frozen_by_lora + adapters
    assert lora.total == full.total + adapters


# ------------------------------------------------------------------------------------------ training runs

STEPS = 6


def _args(run_dir, shards, init, *extra):
    return ["--recipe", "tiny_cpu", f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.lr=1e-2",
            "checkpoint.save_every_steps=3", "logging.wandb=disabled", f"logging.output_dir={run_dir}",
            f"data.shards={shards}", NO_TOKENIZER, f"model.backbone.pretrained_path={init}",
            "model.backbone.tokenizer=pretrained", *LORA, *extra]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_shards):
    """A saved initial backbone (ZeRO-3's random init depends on the rank count), then a LoRA run on 2 ranks with
    ZeRO-3 (zero.Init) and one on 1 rank with ZeRO-2 and accumulation 2: the same global batch."""
    root = tmp_path_factory.mktemp("lora")
    runs = {"init": save_initial_backbone(root / "init", tiny_shards), "zero3": root / "zero3",
            "zero2": root / "zero2"}
    run_ranks(2, _args(runs["zero3"], tiny_shards, runs["init"]), timeout=400)
    run_ranks(1, _args(runs["zero2"], tiny_shards, runs["init"], "train.grad_accum_steps=2", "parallel.zero_stage=2",
                       "parallel.deepspeed_config=ds_configs/zero2.json"), timeout=400)
    return runs


def test_lora_run_learns_under_zero3_and_equals_zero2(lora_runs):
    three, two = read_metrics(lora_runs["zero3"]), read_metrics(lora_runs["zero2"])
    assert len(three) == len(two) == STEPS
    assert three[-1]["loss"] < three[0]["loss"]
    for a, b in zip(three, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


def test_lora_run_resumes_exactly(lora_runs, tiny_shards, tmp_path):
    run_dir = start_from_checkpoint(lora_runs["zero3"], 3, tmp_path / "run")
    run_ranks(2, [*_args(run_dir, tiny_shards, lora_runs["init"]), "checkpoint.resume=auto"], timeout=400)
    assert_steps_repeat_bit_for_bit(lora_runs["zero3"], run_dir, [4, 5, 6])


def test_export_merges_the_adapters_and_writes_the_adapter(lora_runs, tmp_path):
    from safetensors.torch import load_file

    from perceptio_dist.config.training import config_from_dict
    from perceptio_dist.data.training_data import build_loader
    from perceptio_dist.export import consolidated_state_dict, export_checkpoint, load_exported
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer
    from perceptio_dist.train.checkpoint import saved_config

    checkpoint = lora_runs["zero3"] / "checkpoints" / tag_for(STEPS)
    out = export_checkpoint(checkpoint, tmp_path / "export", adapter=True)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 7 and all("lora_" in k for k in adapter)
    exported, tokenizer = load_exported(out)
    assert not any("lora_" in n for n, _ in exported.named_parameters())
    # The adapter model, rebuilt from the checkpoint with its adapters unmerged.
    cfg = config_from_dict(saved_config(checkpoint))
    adapter_model = build_perceptio(cfg.model, load_tokenizer(cfg.model.backbone), torch.float32)
    adapter_model.load_state_dict(consolidated_state_dict(checkpoint, cfg), strict=False)
    adapter_model.eval()
    assert any(float(p.detach().abs().max()) > 0 for n, p in adapter_model.named_parameters() if "lora_B" in n)
    batch = next(iter(build_loader(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0)),
                                   tokenizer, exported.token_ids, 0, 1)))
    with torch.no_grad():
        a = adapter_model.lm_head(adapter_model(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                                batch.sam_images).hidden_states)
        b = exported.lm_head(exported(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                      batch.sam_images).hidden_states)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
