"""Tensor parallelism through DeepSpeed's AutoTP training (parallel.tp_size) on 2 CPU ranks over gloo: the LLM's
decoder projections sharded, everything else replicated. Losses equal a 1-rank ZeRO-2 run on the same global batch,
the run resumes exactly on its own layout (and refuses another), and the export holds the whole weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.train.checkpoint import tag_for

from .conftest import (NO_TOKENIZER, ROOT, assert_steps_repeat_bit_for_bit, read_metrics, run_ranks,
                       start_from_checkpoint)

STEPS = 6
ZERO2 = ["parallel.zero_stage=2", "parallel.deepspeed_config=ds_configs/zero2.json"]


def _args(run_dir, shards, *extra):
    return ["--recipe", "tiny_cpu", f"train.max_steps={STEPS}", "train.warmup_steps=1", "checkpoint.save_every_steps=3",
            "logging.wandb=disabled", "logging.log_samples=true", f"logging.output_dir={run_dir}",
            f"data.shards={shards}", NO_TOKENIZER, *ZERO2, *extra]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, tiny_shards):
    """tp 2 on 2 ranks (one data-parallel replica) and ZeRO-2 on 1 rank: the same global batch of 2, the same
    initial weights (ZeRO-2 builds them unpartitioned from the seed)."""
    root = tmp_path_factory.mktemp("tp")
    runs = {"tp2": root / "tp2", "zero2": root / "zero2"}
    run_ranks(2, _args(runs["tp2"], tiny_shards, "parallel.tp_size=2"), timeout=400)
    run_ranks(1, _args(runs["zero2"], tiny_shards), timeout=400)
    return runs


def test_tensor_parallel_losses_equal_the_zero2_run(tp_runs):
    tp, ref = read_metrics(tp_runs["tp2"]), read_metrics(tp_runs["zero2"])
    assert len(tp) == len(ref) == STEPS
    for a, b in zip(tp, ref):
        assert a["samples"] == b["samples"] == 2 and a["tokens"] == b["tokens"]  # each sample counted once
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    # both ranks of the group read the same samples
    keys = [sorted(json.loads(line)["keys"] for line in (tp_runs["tp2"] / "samples" / f"rank{r}.jsonl").open())
            for r in (0, 1)]
    assert keys[0] == keys[1]
    files = {p.name for p in (tp_runs["tp2"] / "checkpoints" / tag_for(STEPS)).iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= files  # really sharded


def test_tensor_parallel_run_resumes_exactly_and_refuses_another_layout(tp_runs, tiny_shards, tmp_path):
    run_dir = start_from_checkpoint(tp_runs["tp2"], 3, tmp_path / "run")
    other = subprocess.run([sys.executable, "-m", "perceptio_dist.train", *_args(run_dir, tiny_shards),
                            "checkpoint.resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "parallel.tp_size" in other.stderr and "Traceback" not in other.stderr
    run_ranks(2, [*_args(run_dir, tiny_shards, "parallel.tp_size=2"), "checkpoint.resume=auto"], timeout=400)
    assert_steps_repeat_bit_for_bit(tp_runs["tp2"], run_dir, [4, 5, 6])


def test_tensor_parallel_export_holds_the_whole_weights(tp_runs, tmp_path):
    from perceptio_dist.export import export_checkpoint, load_exported

    tp, _ = load_exported(export_checkpoint(tp_runs["tp2"] / "checkpoints" / tag_for(STEPS), tmp_path / "tp"))
    ref, _ = load_exported(export_checkpoint(tp_runs["zero2"] / "checkpoints" / tag_for(STEPS), tmp_path / "z2"))
    ref_params = dict(ref.named_parameters())
    # The two runs' losses agree to 1e-7; their weights after 6 Adam steps differ by float noise that Adam turns into
    # up to lr-sized steps on near-zero gradients, so the weights are compared by norm. A wrong merge of the shards
    # (one shard only, halves swapped, a transposed split) is off by the weight's own size.
    for name, p in tp.named_parameters():
        want = ref_params[name]
        assert p.shape == want.shape, name  # merged from the shards
        assert (p - want).norm() <= 1e-2 * want.norm() + 1e-6, name


def test_tensor_parallel_config_is_validated():
    for overrides, words in [
        (["parallel.tp_size=2"], "parallel.zero_stage=2"),  # the tiny recipe runs ZeRO-3
        ([*ZERO2, "parallel.tp_size=3"], "does not divide"),
        ([*ZERO2, "parallel.tp_size=2", "model.lora.rank=4"], "LoRA"),
        ([*ZERO2, "parallel.tp_size=0"], ">= 1"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config("tiny_cpu", overrides)
