"""Sequence packing (data/packing.py): packed and padded micro-batches of the same samples give the same loss terms
and gradients, attention never crosses samples, and packed training resumes exactly and splits like padded training.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.data.packing import pack, plan_rows
from perceptio_dist.losses.objective import TERMS

from .conftest import NO_TOKENIZER, ROOT, read_metrics, run_ranks, save_initial_backbone
from .test_checkpoint import _wait_for, losses, step_keys


def test_rows_are_few_and_even_by_hand():
    # 5, 3, 4, 2 into rows of 7: 14 tokens -> 2 rows; 5 to A, 4 to B, 3 to the emptier B (7), 2 to A (7).
    assert plan_rows([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    # 4, 4, 3, 3 into rows of 10: first fit would give rows of 8 and 6 (width 8, 2 padding); even rows are 7 and 7.
    assert plan_rows([4, 4, 3, 3], 10) == [[0, 2], [1, 3]]
    # 6, 5, 5 into rows of 8: 16 tokens -> 2 rows, but the third sample fits neither (6 + 5, 5 + 5): 3 rows.
    assert plan_rows([6, 5, 5], 8) == [[0], [1], [2]]
    # 5, 5, 5, 1 into rows of 10: 2 rows are 10 and 6 wide (20 positions), 3 rows 6, 5, 5 (18), 4 rows 20: 3 rows.
    assert plan_rows([5, 5, 5, 1], 10) == [[0, 3], [1], [2]]
    assert plan_rows([1, 1, 1], 3) == [[0, 1, 2]]
    # 3, 3, 2, 2, 2 into rows of 10: longest first gives 3+2+2 and 3+2 (width 7); swapping a 3 of the fullest row
    # with a 2 of the other evens them to 3+3 and 2+2+2 (width 6).
    assert plan_rows([3, 3, 2, 2, 2], 10) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="does not fit"):
        plan_rows([8], 7)


def _samples(cfg, tokenizer, model, count: int):
    """``count`` real samples of every task from the session's shards, in loader order."""
    from perceptio_dist.data.training_data import build_loader

    loader = build_loader(cfg, tokenizer, model.token_ids, rank=0, world_size=1)
    shards = loader._open_shards()
    samples, keys = [], []
    for ref in loader.sample_refs(0)[:count]:
        raw = shards.sample(loader.shards[ref.task][ref.shard], ref.index)
        samples.append(loader.builder(raw))
        keys.append(raw.key)
    return samples, keys


@pytest.fixture(scope="module")
def packing_setup(tmp_path_factory, tiny_shards):
    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer
    from perceptio_dist.parallel.zero import PerceptioTrainingModule

    cfg = load_config("tiny_cpu", [f"logging.output_dir={tmp_path_factory.mktemp('run')}", "logging.wandb=disabled",
                                   f"data.shards={tiny_shards}", NO_TOKENIZER, "train.micro_batch_size=8",
                                   "data.num_workers=0", "train.precision=fp32"])
    tokenizer = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    model = build_perceptio(cfg.model, tokenizer, torch.float32, seed=0).train()
    samples, keys = _samples(cfg, tokenizer, model, 8)

    def module_for(weighting: str, implementation: str):
        objective_cfg = dataclasses.replace(cfg.objective, text_weighting=weighting, implementation=implementation)
        return PerceptioTrainingModule(model, PerceptioObjective(objective_cfg, model.token_ids),
                                       LMHeadTermsModule(implementation))

    return cfg, tokenizer, model, samples, keys, module_for


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    total, terms, counts = module(**batch.as_dict())
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return total.detach(), terms, counts, grads


@pytest.mark.parametrize("weighting,implementation,flatten", [("token", "fused_torch", False),
                                                              ("sample", "reference", False),
                                                              ("square", "fused_torch", False),
                                                              ("token", "fused_torch", True)])
def test_packed_and_padded_micro_batches_give_the_same_terms_and_gradients(packing_setup, weighting, implementation,
                                                                           flatten):
    """``flatten``: the packed rows run as one flattened row (flash-attention-2's layout), here under sdpa."""
    from perceptio_dist.data.batch import collate

    cfg, tokenizer, model, samples, keys, module_for = packing_setup
    model.flatten_packed_rows = flatten
    lengths = [s.input_ids.numel() for s in samples]
    budget = 3 * max(lengths)
    padded = collate(samples, tokenizer.pad_token_id, keys)
    packed = pack(samples, budget, tokenizer.pad_token_id, keys)
    # The layout really differs: fewer rows than samples, rows holding several samples, a mix of tasks.
    assert packed.input_ids.shape[0] < len(samples) and packed.packed and not padded.packed
    assert packed.num_tokens == padded.num_tokens == sum(lengths)
    assert sorted(packed.keys) == sorted(keys) and packed.num_samples == len(samples)
    assert packed.seg_masks.shape[0] > 0 and packed.teacher_depth.shape[0] > 0
    module = module_for(weighting, implementation)
    ref_total, ref_terms, ref_counts, ref_grads = _loss_and_grads(module, padded)
    total, terms, counts, grads = _loss_and_grads(module, packed)
    assert torch.equal(counts, ref_counts)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-5)
    for name, a, b in zip(TERMS, terms.tolist(), ref_terms.tolist()):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), name
    assert set(grads) == set(ref_grads) and len(grads) > 50
    # 1e-5 relative per parameter; a gradient that is zero in exact arithmetic (attention key biases: softmax does not
    # see a shift) holds float noise only, so it is measured against the whole gradient's norm instead.
    whole = torch.stack([g.norm() for g in ref_grads.values()]).norm().item()
    for name, g in grads.items():
        scale = ref_grads[name].norm().item()
        assert (g - ref_grads[name]).norm().item() <= 1e-5 * scale + 1e-8 * whole, name
    model.flatten_packed_rows = False


def test_flattened_packed_rows_take_flash_attentions_varlen_path(packing_setup):
    """What the language model receives, read by transformers' own test for flash-attention-2's varlen path
    (``_is_packed_sequence``): the packed rows as they are fail it (FA2 would attend across samples of a row);
    flattened, they pass it, with one sequence per sample and per row's padding."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    cfg, tokenizer, model, samples, keys, _ = packing_setup
    budget = 3 * max(s.input_ids.numel() for s in samples)
    batch = pack(samples, budget, tokenizer.pad_token_id, keys)
    rows = batch.input_ids.shape[0]
    assert rows > 1
    seen = []
    hook = model.backbone.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        model.eval()
        with torch.no_grad():
            for flatten in (False, True):
                model.flatten_packed_rows = flatten
                model(**_model_inputs(batch))
    finally:
        hook.remove()
        model.flatten_packed_rows = False
        model.train()
    as_rows, flat = seen
    assert as_rows.shape == batch.input_ids.shape and not _is_packed_sequence(as_rows, rows)
    assert flat.shape == (1, batch.input_ids.numel()) and _is_packed_sequence(flat, 1)
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(flat)
    padded_rows = sum(int((batch.sample_index[r] < 0).any()) for r in range(rows))
    assert cu_seqlens.numel() - 1 == len(samples) + padded_rows


def test_attention_never_crosses_samples(packing_setup):
    """Changing one sample's tokens changes its own hidden states and no other sample's in the same row."""
    cfg, tokenizer, model, samples, keys, _ = packing_setup
    budget = 3 * max(s.input_ids.numel() for s in samples)
    batch = pack(samples, budget, tokenizer.pad_token_id, keys)
    row = next(r for r in range(batch.input_ids.shape[0]) if len(set(batch.sample_index[r].tolist()) - {-1}) > 1)
    first_sample = int(batch.sample_index[row, 0])
    changed = dataclasses.replace(batch, input_ids=batch.input_ids.clone())
    own = (batch.sample_index == first_sample).nonzero(as_tuple=True)
    text_positions = [int(c) for c in own[1].tolist() if int(batch.input_ids[row, c]) < 100][:3]
    assert text_positions, "the sample has no plain-text token to change"
    for c in text_positions:
        changed.input_ids[row, c] = (int(batch.input_ids[row, c]) + 7) % 100
    model.eval()
    with torch.no_grad():
        before = model(**_model_inputs(batch)).hidden_states
        after = model(**_model_inputs(changed)).hidden_states
    model.train()
    mine = batch.sample_index == first_sample
    others = (batch.sample_index >= 0) & ~mine
    assert (after[mine] - before[mine]).abs().max() > 1e-3  # the change is visible where it should be
    assert torch.equal(after[others], before[others])


def _model_inputs(batch) -> dict:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values,
            "sam_images": batch.sam_images, "sample_index": batch.sample_index, "position_ids": batch.position_ids}


def test_packing_config_is_validated():
    with pytest.raises(ConfigError, match="'data.max_tokens_per_row'.*below data.max_seq_len"):
        load_config("tiny_cpu", ["data.max_tokens_per_row=100"])
    with pytest.raises(ConfigError, match="'data.packing'.*pipeline"):
        load_config("tiny_cpu", ["data.packing=true", "parallel.mode=pipeline", "parallel.zero_stage=1",
                                 "parallel.pp_stages=2"])


# ------------------------------------------------------------------------------- packed training runs

STEPS = 8
PACKED = ["data.packing=true", "data.max_tokens_per_row=1024"]  # a tiny micro-batch of 2 (~80 tokens each): 1 row


def _run_args(run_dir, shards, init, accum: int, *extra: str) -> list[str]:
    return ["--recipe", "tiny_cpu", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.micro_batch_size=2",
            f"train.grad_accum_steps={accum}", "checkpoint.save_every_steps=3", "logging.log_samples=true",
            "logging.wandb=disabled", f"logging.output_dir={run_dir}", f"data.shards={shards}", NO_TOKENIZER,
            f"model.backbone.pretrained_path={init}", "model.backbone.tokenizer=pretrained", *extra]


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory, tiny_shards):
    """One saved initial model (ZeRO-3 random init depends on the rank count), then: packed on 2 ranks, packed on
    1 rank with accumulation 2, padded on 2 ranks. Same global batch of 4."""
    root = tmp_path_factory.mktemp("packed")
    runs = {"init": save_initial_backbone(root / "init", tiny_shards)}
    for name, nproc, accum, extra in [("packed_2x1", 2, 1, PACKED), ("packed_1x2", 1, 2, PACKED),
                                      ("padded_2x1", 2, 1, [])]:
        runs[name] = root / name
        run_ranks(nproc, _run_args(runs[name], tiny_shards, runs["init"], accum, *extra), timeout=400)
    return runs


def test_packed_training_logs_its_layout_and_equals_padded_training(packed_runs):
    packed, padded = read_metrics(packed_runs["packed_2x1"]), read_metrics(packed_runs["padded_2x1"])
    assert len(packed) == len(padded) == STEPS
    for a, b in zip(packed, padded):
        assert a["samples"] == b["samples"] == 4 and a["tokens"] == b["tokens"]  # real tokens only
        assert a["padding_fraction"] <= b["padding_fraction"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    assert any(a["padding_fraction"] < b["padding_fraction"] for a, b in zip(packed, padded))


def test_packed_one_rank_with_accumulation_equals_two_ranks(packed_runs):
    two, one = read_metrics(packed_runs["packed_2x1"]), read_metrics(packed_runs["packed_1x2"])
    assert [m["step"] for m in one] == [m["step"] for m in two]
    assert two[-1]["loss"] < two[0]["loss"]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


def test_packed_run_resumes_bit_for_bit_after_kill_minus_nine(packed_runs, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = _run_args(run_dir, tiny_shards, packed_runs["init"], 1, *PACKED)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "perceptio_dist.train", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt = run_dir / "checkpoints"
    _wait_for(lambda: (ckpt / "latest").exists(), 300, "the first checkpoint")
    ranks = [p for p in psutil.Process(proc.pid).children() if "perceptio_dist.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    resumed_from = int((ckpt / "latest").read_text().removeprefix("global_step"))
    assert resumed_from < STEPS
    run_ranks(2, [*args, "checkpoint.resume=auto"], timeout=400)
    want, got = losses(packed_runs["packed_2x1"]), losses(run_dir)
    for step in range(resumed_from + 1, STEPS + 1):
        assert got[step] == want[step], step  # bit for bit
    assert step_keys(run_dir) == step_keys(packed_runs["packed_2x1"])
