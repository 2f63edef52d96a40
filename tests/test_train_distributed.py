"""Multi-rank training on CPU over gloo with DeepSpeed: the acceptance checks of the foundation.

Each test launches real ranks with torchrun (or the console script) and a timeout, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CLUSTER_SHELL, NO_TOKENIZER, ROOT, read_metrics, run_ranks, without_launcher_variables

HELPER = str(ROOT / "tests/helpers/train_with_rank_overrides.py")
TERMS = ("text", "marker", "token", "count", "reconstruction", "mask")


def test_console_script_trains_tiny_model_on_two_ranks_with_zero3(tmp_path, tiny_shards):
    """The README's main command: every term finite and logged, loss falls, wandb offline, checkpoint written."""
    run_dir = tmp_path / "run"
    exe = shutil.which("perceptio-train", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [exe, "--nproc-per-node", "2", "--recipe", "tiny_cpu", "train.max_steps=30", f"data.shards={tiny_shards}",
         NO_TOKENIZER,
         f"logging.output_dir={run_dir}", "logging.wandb=offline"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=without_launcher_variables(dict(os.environ)),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "attention implementation: sdpa" in proc.stderr
    assert "LM-head loss implementation: fused_torch" in proc.stderr
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for m in metrics:
        assert math.isfinite(m["loss"])
        for key in ("tokens_per_s", "samples_per_s", "mfu", "lr", "grad_norm"):
            assert m[key] is not None and math.isfinite(m[key]) and m[key] >= 0, key
        for term in TERMS:  # a term is None only when no sample of the global batch had its target
            assert m[f"loss/{term}"] is None or math.isfinite(m[f"loss/{term}"])
    for term in TERMS:
        logged = [m[f"loss/{term}"] for m in metrics if m[f"loss/{term}"] is not None]
        assert len(logged) >= 20, term
    first = sum(m["loss"] for m in metrics[:5]) / 5
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    for term in ("text", "marker"):
        assert metrics[-1][f"loss/{term}"] < 0.6 * metrics[0][f"loss/{term}"], term
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb should have written an offline run"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step00000030"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["attn_implementation"] == "sdpa"


def test_zero3_partitions_every_parameter_across_ranks(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    run_ranks(2, ["--dump-partition", "train.max_steps=2", "train.warmup_steps=1", f"logging.output_dir={run_dir}",
                  f"data.shards={tiny_shards}", NO_TOKENIZER],
              timeout=300, script=HELPER)
    reports = [json.loads((run_dir / f"partition_rank{r}.json").read_text()) for r in range(2)]
    params = [{p["name"]: p for p in rep["parameters"]} for rep in reports]
    assert params[0].keys() == params[1].keys() and len(params[0]) > 100
    total = 0
    for name, p in params[0].items():
        assert not p["persistent"], name  # the tiny DeepSpeed config partitions everything
        for rank in range(2):
            assert params[rank][name]["local_numel"] == math.ceil(p["full_numel"] / 2), name
        total += p["full_numel"]
    local = sum(p["local_numel"] for p in params[0].values())
    assert 0.49 < local / total < 0.52  # each rank holds about half of the model
    # embeddings and LM head were resized for the spatial tokens while already partitioned
    for rep in reports:
        assert rep["embedding_rows"] == rep["lm_head_rows"] == rep["tokenizer_size"]


def test_rank_without_spatial_targets_does_not_hang(tmp_path, tiny_shards):
    """ZeRO-3 rule: rank 0 reads only referring segmentation ([SEG] and a depth block in every sample),
    rank 1 only VQA (neither)."""
    run_dir = tmp_path / "run"
    run_ranks(2, [
        "--rank", "0", "data.task_weights={referring_seg: 1.0}",
        "--rank", "1", "data.task_weights={vqa: 1.0}",
        "train.max_steps=5", "train.warmup_steps=1", "parallel.timeout_minutes=2", f"logging.output_dir={run_dir}",
        f"data.shards={tiny_shards}", NO_TOKENIZER,
    ], timeout=300, script=HELPER)
    metrics = read_metrics(run_dir)
    assert len(metrics) == 5
    for m in metrics:
        for term in TERMS:  # rank 0 scores every term every step
            assert math.isfinite(m[f"loss/{term}"]), term
    losses = [json.loads((run_dir / f"losses_rank{r}.json").read_text()) for r in range(2)]
    assert losses[0] == losses[1]  # logged loss is the all-reduced mean on every rank


def _losses(run_dir: Path) -> list[float]:
    return json.loads((run_dir / "summary.json").read_text())["losses"]


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, tiny_cfg, tiny_tokenizer):
    """2 ranks x micro 2 (ZeRO-3) == 1 rank x micro 2 x accum 2 (ZeRO-3, and ZeRO-2): same samples, same updates.
    And the fused LM-head loss (the default) == the reference loss, both on 2 ranks with ZeRO-3.

    All runs start from one saved tiny checkpoint (ZeRO-3 loads it straight into partitioned
    parameters; random initialisation under zero.Init depends on the rank count, so it cannot be
    the common start). They then differ only in summation order: gradient all-reduce vs
    accumulation, partitioned vs whole parameters. When this was written the three trajectories
    agreed to 7 significant digits over 8 steps. Tolerance: 1e-5 relative, which still leaves room
    for Adam magnifying float noise on near-zero gradients.
    """
    import torch

    from perceptio_dist.model.perceptio import build_perceptio

    torch.manual_seed(0)
    init = tmp_path / "init"
    build_perceptio(tiny_cfg.model, tiny_tokenizer).backbone.save_pretrained(init)
    tiny_tokenizer.save_pretrained(init)
    common = ["train.max_steps=8", "train.warmup_steps=2", "checkpoint.save_final=false",
              f"data.shards={tiny_cfg.data.shards}", NO_TOKENIZER,
              f"model.backbone.pretrained_path={init}", "model.backbone.tokenizer=pretrained"]
    two = tmp_path / "two_ranks_zero3"
    run_ranks(2, ["--recipe", "tiny_cpu", *common, f"logging.output_dir={two}"], timeout=300)
    one = tmp_path / "one_rank_zero3"
    run_ranks(1, ["--recipe", "tiny_cpu", *common, "train.grad_accum_steps=2", f"logging.output_dir={one}"],
              timeout=300)
    zero2 = tmp_path / "one_rank_zero2"
    run_ranks(1, ["--recipe", "tiny_cpu", *common, "train.grad_accum_steps=2", "parallel.zero_stage=2",
                  "parallel.deepspeed_config=ds_configs/zero2.json", f"logging.output_dir={zero2}"], timeout=300)
    unfused = tmp_path / "two_ranks_zero3_reference_loss"
    run_ranks(2, ["--recipe", "tiny_cpu", *common, "objective.implementation=reference",
                  f"logging.output_dir={unfused}"], timeout=300)
    reference = _losses(zero2)
    assert len(reference) == 8 and reference[-1] < reference[0]
    for other in (_losses(two), _losses(one), _losses(unfused)):
        for step, (a, b) in enumerate(zip(other, reference)):
            assert a == pytest.approx(b, rel=1e-5), (step, other, reference)


def test_bf16_with_activation_checkpointing_trains(tmp_path, tiny_shards):
    """bf16 parameters (fp32 master weights in the optimizer) and recomputed layers, ZeRO-3 on 2 ranks."""
    run_dir = tmp_path / "run"
    run_ranks(2, ["--recipe", "tiny_cpu", "train.precision=bf16", "train.activation_checkpointing=true",
                  "train.max_steps=6", "train.warmup_steps=1", "checkpoint.save_final=false",
                  f"logging.output_dir={run_dir}", f"data.shards={tiny_shards}", NO_TOKENIZER], timeout=300)
    metrics = read_metrics(run_dir)
    assert len(metrics) == 6 and all(math.isfinite(m["loss"]) for m in metrics)
    # the total depends on which terms a step's samples carry; the text term is comparable step to step
    assert metrics[-1]["loss/text"] < metrics[0]["loss/text"]


# One global batch of 2 samples, a text-only VQA answer and a relative-depth answer (depth block and letter),
# split three ways and cut into two pipeline stages. data.seed picks a first step that holds one of each.
SPLIT_STEP = ["--recipe", "tiny_cpu", "train.max_steps=1", "train.warmup_steps=0", NO_TOKENIZER,
              "logging.wandb=disabled", "logging.log_samples=true", "checkpoint.save_final=false",
              "parallel.zero_init=false", "data.task_weights={vqa: 1.0, relative_depth: 1.0}", "data.seed=8"]
SPLITS = {
    "1 rank, micro 2 x accum 1": (1, ["train.micro_batch_size=2", "train.grad_accum_steps=1"]),
    "1 rank, micro 1 x accum 2": (1, ["train.micro_batch_size=1", "train.grad_accum_steps=2"]),
    "2 ranks, micro 1 x accum 1": (2, ["train.micro_batch_size=1", "train.grad_accum_steps=1"]),
    "2 pipeline stages, micro 1 x accum 2": (2, ["train.micro_batch_size=1", "train.grad_accum_steps=2",
                                                 "parallel.mode=pipeline", "parallel.zero_stage=0",
                                                 "parallel.pp_stages=2",
                                                 "parallel.deepspeed_config=ds_configs/pipeline.json"]),
}


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, tiny_shards) -> dict[str, Path]:
    runs = {}
    for name, (nproc, overrides) in SPLITS.items():
        run_dir = tmp_path_factory.mktemp("split") / "run"
        run_ranks(nproc, [*SPLIT_STEP, f"data.shards={tiny_shards}", f"logging.output_dir={run_dir}", *overrides,
                          "--dump-grads"], timeout=600, module=None, script=HELPER)
        runs[name] = run_dir
    return runs


def _gradients(run_dir: Path) -> dict:
    import torch

    grads = {}
    for path in sorted(run_dir.glob("grads_rank*.pt")):
        for name, grad in torch.load(path, weights_only=True).items():
            grads.setdefault(name, grad)  # ZeRO ranks hold the same full gradients; stages hold their own
    return grads


def test_gradients_do_not_depend_on_how_the_step_is_split(split_runs):
    """The step's gradient is the gradient of the step's per-item objective for every split (1e-5 relative),
    and so is the logged loss and every term (1e-6); the micro-batches hold a text-only answer and one with a
    depth block, of very different lengths."""
    keys = set()
    for line in (split_runs["1 rank, micro 1 x accum 2"] / "samples" / "rank0.jsonl").read_text().splitlines():
        keys.update(json.loads(line)["keys"])
    assert any("vqa" in k for k in keys) and any("reldepth" in k for k in keys), keys
    reference_name = "1 rank, micro 2 x accum 1"
    reference = _gradients(split_runs[reference_name])
    ref_metrics = read_metrics(split_runs[reference_name])[0]
    assert len(reference) > 50
    for name, run_dir in split_runs.items():
        grads = _gradients(run_dir)
        assert set(grads) == set(reference), (name, set(grads) ^ set(reference))
        for param, grad in grads.items():
            scale = reference[param].norm().item()
            assert (grad - reference[param]).norm().item() <= 1e-5 * scale + 1e-12, (name, param)
        metrics = read_metrics(run_dir)[0]
        for key in ["loss"] + [f"loss/{t}" for t in TERMS]:
            if ref_metrics[key] is None:  # no [SEG] in this step: no mask term anywhere
                assert metrics[key] is None, (name, key)
            else:
                assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6), (name, key)


def test_logged_loss_is_the_whole_batch_through_the_reference_path(split_runs, tiny_cfg, tiny_tokenizer):
    """The 2-rank run's logged loss against the global batch computed at once, in this process, with the
    reference LM-head path (full logits) and the same initial weights."""
    import dataclasses

    import torch

    from perceptio_dist.data.training_data import build_loader
    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.parallel.zero import PerceptioTrainingModule
    from perceptio_dist.train.trainer import seed_everything

    cfg = dataclasses.replace(
        tiny_cfg, train=dataclasses.replace(tiny_cfg.train, micro_batch_size=2, grad_accum_steps=1),
        data=dataclasses.replace(tiny_cfg.data, task_weights={"vqa": 1.0, "relative_depth": 1.0}, seed=8))
    seed_everything(cfg.train.seed)
    model = build_perceptio(cfg.model, tiny_tokenizer, torch.float32, seed=cfg.train.seed).train()
    batch = next(iter(build_loader(cfg, tiny_tokenizer, model.token_ids, rank=0, world_size=1)))
    module = PerceptioTrainingModule(model, PerceptioObjective(cfg.objective, model.token_ids),
                                     LMHeadTermsModule("reference"))
    with torch.no_grad():
        total, _, _ = module(**batch.as_dict())
    logged = read_metrics(split_runs["2 ranks, micro 1 x accum 1"])[0]["loss"]
    assert logged == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("nproc", [None, 2])
def test_training_ignores_the_outer_allocation_of_the_users_shell(tmp_path, tiny_shards, nproc):
    """perceptio-train in a salloc shell: one process is a world of one, --nproc-per-node 2 a world of two; the
    SLURM_* variables of the allocation, OMP_NUM_THREADS=1 and an empty CUDA_VISIBLE_DEVICES change nothing."""
    run_dir = tmp_path / "run"
    exe = shutil.which("perceptio-train", path=str(Path(sys.executable).parent))
    launch = ["--nproc-per-node", str(nproc)] if nproc else []
    proc = subprocess.run(
        [exe, *launch, "--recipe", "tiny_cpu", "train.max_steps=2", "train.warmup_steps=0", f"data.shards={tiny_shards}",
         NO_TOKENIZER,
         f"logging.output_dir={run_dir}", "logging.wandb=disabled", "train.micro_batch_size=1",
         f"train.grad_accum_steps={2 // (nproc or 1)}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**without_launcher_variables(dict(os.environ)), **CLUSTER_SHELL})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == (nproc or 1) and summary["steps"] == 2
    assert f"ranks: {nproc or 1} (cpu)" in proc.stderr


_DEEPSPEED_SHM = Path("/dev/shm")


def _deepspeed_shm_segments() -> set[str]:
    return {p.name for p in _DEEPSPEED_SHM.glob("deepspeed_allreduce_buffer_*")}


_LOCAL_COUNT_SCRIPT = """\
import os, sys
from pathlib import Path
import deepspeed.utils.numa as numa
from deepspeed.accelerator import get_accelerator
from perceptio_dist.parallel.distributed import init_distributed
init_distributed()  # DeepSpeed's start counts once itself, before LOCAL_SIZE can be set
def numactl_queried():
    raise AssertionError('DeepSpeed ran numactl to count CPU devices')
numa.get_numa_cores = numactl_queried
expected = sys.argv[1]
assert os.environ['LOCAL_SIZE'] == os.environ['LOCAL_WORLD_SIZE'] == expected, os.environ.get('LOCAL_SIZE')
assert get_accelerator().device_count() == int(expected)
port = os.environ['MASTER_PORT']
leaked = sorted(p.name for p in Path('/dev/shm').glob(f'deepspeed_allreduce_buffer_*_{port}_*'))
assert not leaked, f'DeepSpeed created shared-memory segments it never unlinks: {leaked}'
print('counted', flush=True)
"""


def test_cpu_ranks_tell_deepspeed_their_local_count_without_numactl_or_leaking_shared_memory(tmp_path):
    """DeepSpeed's CPU accelerator counts local "devices" from LOCAL_SIZE (set only by DeepSpeed's own launcher) and
    otherwise runs `numactl --hardware` on every count: ZeRO-3 counts once per gradient bucket. Under torchrun
    init_distributed sets it from LOCAL_WORLD_SIZE; the numactl query here fails the test if it still runs.
    LOCAL_SIZE present while DeepSpeed's backend starts makes it create a /dev/shm segment per rank that it never
    unlinks (69 MB each; the suite filled /dev/shm that way), also when the variable is inherited."""
    script = tmp_path / "count.py"
    script.write_text(_LOCAL_COUNT_SCRIPT)
    before = _deepspeed_shm_segments()
    try:
        proc = run_ranks(2, ["2"], timeout=120, script=str(script))
        assert proc.stdout.count("counted") == 2
        inherited = subprocess.run(
            [sys.executable, str(script), "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**without_launcher_variables(dict(os.environ)), "LOCAL_SIZE": "1"})
        assert inherited.returncode == 0 and "counted" in inherited.stdout, inherited.stderr[-3000:]
        assert not _deepspeed_shm_segments() - before
    finally:  # a failure here must not leave its segments to fill /dev/shm for the rest of the suite
        for name in _deepspeed_shm_segments() - before:
            (_DEEPSPEED_SHM / name).unlink(missing_ok=True)
