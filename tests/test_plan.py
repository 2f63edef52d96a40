"""The memory planner: model states against DeepSpeed's own estimators, stage splits, parameter counts
against a real built model, activations by hand, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys

import pytest

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.plan import Block, Cluster, ModelSizes, model_sizes, plan, split_stages

from .conftest import NO_TOKENIZER, ROOT

GIB = 1024 ** 3


@pytest.fixture(scope="module")
def sizes_8b():
    return model_sizes(load_config("perceptio_8b", []))


def _deepspeed_none_offload_row(printed: str) -> float:
    """The per-GPU figure of the row without any offload, as DeepSpeed's *_all_cold estimators print it."""
    for line in printed.splitlines():
        if "offload_optimizer=none" in line and "offload_param=OffloadDeviceEnum" not in line:
            return float(re.search(r"\|\s*([\d.]+)GB\s*\|", line).group(1))
    raise AssertionError(printed)


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_model_states_within_5_percent_of_deepspeed_estimators_for_8b(sizes_8b, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    cluster = Cluster(nodes=nodes, gpus_per_node=8, gpu_memory_gb=80)
    plans = {p.layout: p for p in plan(sizes_8b, cluster, global_batch=16 * nodes, pp_stages=[2, 4])}
    for layout, estimator, args in (
        ("zero3", estimate_zero3_model_states_mem_needs_all_cold, (sizes_8b.total, sizes_8b.largest_layer)),
        ("zero2", estimate_zero2_model_states_mem_needs_all_cold, (sizes_8b.total,)),
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            estimator(*args, num_gpus_per_node=8, num_nodes=nodes)
        deepspeed_gb = _deepspeed_none_offload_row(out.getvalue())
        ours = plans[layout].model_states_gb
        # DeepSpeed counts every parameter as trainable; ours keeps only bf16 copies of the frozen ones.
        assert ours <= deepspeed_gb * 1.005
        assert abs(ours - deepspeed_gb) / deepspeed_gb < 0.05, (layout, ours, deepspeed_gb)


def test_all_trainable_model_states_equal_deepspeed_formulas_exactly():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    blocks = (Block("a", 1000, 1000, 0), Block("b", 1000, 1000, 0), *(Block(f"decoder.{i}", 3000, 3000, 0)
                                                                     for i in range(4)), Block("head", 500, 500, 0))
    total = sum(b.params for b in blocks)
    sizes = ModelSizes(total, total, 3000, blocks, 0.0, 1e9)
    for gpus, nodes in ((8, 1), (8, 2)):
        plans = {p.layout: p for p in plan(sizes, Cluster(nodes=nodes, gpus_per_node=gpus), 8, [])}
        _, zero3, _ = estimate_zero3_model_states_mem_needs(total, 3000, gpus, nodes, cpu_offload=False,
                                                             cpu_offload_params=False)
        _, zero2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
        assert plans["zero3"].model_states_gb * GIB == pytest.approx(zero3, abs=2)
        assert plans["zero2"].model_states_gb * GIB == pytest.approx(zero2, abs=2)


def test_stage_split_is_contiguous_balanced_and_keeps_the_ends(sizes_8b):
    for stages in (2, 4, 8):
        split = split_stages(sizes_8b.blocks, stages)
        assert len(split) == stages
        assert [b for stage in split for b in stage] == list(sizes_8b.blocks)
        assert split[0][0].name == "vision_tower" and split[-1][-1].name.startswith("norm+lm_head")
        assert all(any(b.name.startswith("decoder.") for b in stage) for stage in split)
        # Balanced by trainable parameters (what the optimizer states and gradients scale with).
        loads = [sum(b.trainable for b in stage) for stage in split]
        layer = max(b.trainable for b in sizes_8b.blocks if b.name.startswith("decoder."))
        ends = max(sizes_8b.blocks[0].trainable + sizes_8b.blocks[1].trainable, sizes_8b.blocks[-1].trainable)
        assert max(loads) - min(loads) <= 2 * layer + ends, loads
    with pytest.raises(ValueError, match="pipeline stages"):
        split_stages(sizes_8b.blocks, 1000)
    explicit = split_stages(sizes_8b.blocks, 2, layers_per_stage=[10, 22])
    assert [len([b for b in stage if b.name.startswith("decoder.")]) for stage in explicit] == [10, 22]


def test_parameter_counts_match_a_real_built_model():
    tiny_cfg = load_config("tiny_cpu", [NO_TOKENIZER])
    from perceptio_dist.model.perceptio import build_perceptio, parameter_report
    from perceptio_dist.model.tokenizer import load_tokenizer

    sizes = model_sizes(tiny_cfg)
    real = parameter_report(build_perceptio(tiny_cfg.model, load_tokenizer(tiny_cfg.model.backbone)))
    assert sizes.total == real["total"]
    assert sizes.trainable == real["trainable"]
    assert sum(b.params for b in sizes.blocks) == real["total"]


def test_activation_estimate_by_hand():
    cfg = load_config("tiny_cpu", [NO_TOKENIZER, "train.activation_checkpointing=false"])
    text = cfg.model.backbone.text
    sizes = model_sizes(cfg)
    kv = text.num_kv_heads * (text.hidden_size // text.num_heads)
    per_layer = 2 * cfg.data.max_seq_len * (6 * text.hidden_size + 2 * kv + 4 * text.intermediate_size)
    decoder = [b for b in sizes.blocks if b.name.startswith("decoder.")]
    assert len(decoder) == text.num_layers
    assert all(b.activation_bytes == per_layer and b.recompute_bytes == 0 for b in decoder)
    checkpointed = model_sizes(load_config("tiny_cpu", [NO_TOKENIZER, "train.activation_checkpointing=true"]))
    kept = [b for b in checkpointed.blocks if b.name.startswith("decoder.")]
    assert all(b.activation_bytes == 2 * cfg.data.max_seq_len * text.hidden_size for b in kept)
    assert all(b.recompute_bytes == per_layer for b in kept)


def test_more_nodes_never_need_more_memory_per_gpu_and_bigger_gpus_fit_bigger_micro_batches(sizes_8b):
    by_nodes = [{p.layout: p for p in plan(sizes_8b, Cluster(nodes=n), 16 * n, [2])} for n in (1, 2, 4)]
    for layout in ("zero2", "zero3", "pp2xzero1"):
        states = [p[layout].model_states_gb for p in by_nodes]
        assert states == sorted(states, reverse=True), (layout, states)
    small = {p.layout: p for p in plan(sizes_8b, Cluster(gpu_memory_gb=40), 16, [])}
    big = {p.layout: p for p in plan(sizes_8b, Cluster(gpu_memory_gb=141), 16, [])}
    assert all(big[k].max_micro_batch > small[k].max_micro_batch for k in small)


def test_cli_prints_the_table_and_rejects_bad_input():
    exe = [sys.executable, "-m", "perceptio_dist.cli.plan"]
    ok = subprocess.run([*exe, "--recipe", "perceptio_8b", "--nodes", "2"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "| zero3 |" in ok.stdout and "| pp2xzero1 |" in ok.stdout and "2 node(s) x 8 GPUs" in ok.stdout
    bad = subprocess.run([*exe, "--nodes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--nodes must be positive" in bad.stderr and "Traceback" not in bad.stderr
    wrong = subprocess.run([*exe, "train.lr=abc"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "train.lr" in wrong.stderr and "Traceback" not in wrong.stderr


def test_packing_counts_real_tokens_and_packed_rows(sizes_8b):
    """FLOPs follow the mean sample length (real tokens); with packing the activation unit is a row of
    data.max_tokens_per_row tokens holding row // mean samples, and the largest micro-batch is counted in samples."""
    seq = load_config("perceptio_8b", []).data.max_seq_len
    mean = seq // 8
    padded = model_sizes(load_config("perceptio_8b", []), mean_sample_tokens=mean)
    packed = model_sizes(load_config("perceptio_8b", ["data.packing=true", f"data.max_tokens_per_row={2 * seq}"]),
                         mean_sample_tokens=mean)
    assert padded.samples_per_row == 1 and packed.samples_per_row == 16
    assert packed.flops_per_sample == padded.flops_per_sample < sizes_8b.flops_per_sample
    # Hand: the LLM part of the FLOPs, 6 N T + 12 L d T^2, at T = seq against T = seq / 8 (vision identical).
    from perceptio_dist.model.perceptio import build_perceptio_meta
    from perceptio_dist.train.flops import flops_model_for

    f = flops_model_for(build_perceptio_meta(load_config("perceptio_8b", []).model))
    # The LM head: the rows outside the image tiles (max_tiles + a thumbnail), at least one.
    image_tokens = (load_config("perceptio_8b", []).model.backbone.max_tiles + 1) * f.image_tokens_per_tile
    head_rows = [max(1, t - image_tokens) for t in (seq, mean)]
    by_hand = (6 * f.llm_params * (seq - mean) + 12 * f.llm_layers * f.llm_hidden * (seq * seq - mean * mean)
               + 6 * f.lm_head_params * (head_rows[0] - head_rows[1]))
    assert sizes_8b.flops_per_sample - padded.flops_per_sample == pytest.approx(by_hand, rel=1e-9)
    # A decoder layer's activations grow with the unit's tokens: a packed row of 2 x seq holds twice a padded sample's.
    layer = {b.name: b for b in padded.blocks}["decoder.0"].activation_bytes
    assert {b.name: b for b in packed.blocks}["decoder.0"].activation_bytes == pytest.approx(2 * layer)
    cluster = Cluster(gpu_memory_gb=141)
    rows = {p.layout: p for p in plan(packed, cluster, 16, [])}
    units = {p.layout: p for p in plan(dataclasses.replace(packed, samples_per_row=1), cluster, 16, [])}
    assert rows["zero3"].max_micro_batch == 16 * units["zero3"].max_micro_batch > 0
    with pytest.raises(ConfigError, match="mean-sample-tokens"):
        model_sizes(load_config("perceptio_8b", []), mean_sample_tokens=seq + 1)


def test_tensor_parallel_rows_by_hand(sizes_8b):
    """tp x ZeRO-2: decoder weights split tp ways, the rest replicated; gradients and optimizer states over n / tp."""
    cluster = Cluster(nodes=1, gpus_per_node=8, gpu_memory_gb=80)
    rows = {p.layout: p for p in plan(sizes_8b, cluster, 16, [], tp_sizes=[2, 3, 4])}
    assert "tp3xzero2" not in rows  # 32 heads / 8 KV heads do not split 3 ways
    decoder = [b for b in sizes_8b.blocks if b.name.startswith("decoder.")]
    dec_p, dec_t = sum(b.params for b in decoder), sum(b.trainable for b in decoder)
    for tp in (2, 4):
        params = sizes_8b.total - dec_p + dec_p / tp
        trainable = sizes_8b.trainable - dec_t + dec_t / tp
        row = rows[f"tp{tp}xzero2"]
        assert row.params_gb * GIB == pytest.approx(2 * params)
        assert row.grads_gb * GIB == pytest.approx(6 * trainable / (8 // tp))
        assert row.optimizer_gb * GIB == pytest.approx(12 * trainable / (8 // tp))
    assert rows["tp2xzero2"].params_gb < rows["zero2"].params_gb
