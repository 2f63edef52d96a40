"""Checkpoints and fault tolerance on 2 CPU ranks (gloo, ZeRO-3): kill -9 and resume, a damaged checkpoint,
elastic resume on 1 and 4 ranks, SIGUSR1 and the requeue status, non-finite losses, export.

Every run uses the same global batch (4 = ranks x accumulation x micro-batch 1), so the samples of a step
do not depend on the layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from perceptio_dist.train.checkpoint import CheckpointManager, read_marker, tag_for
from perceptio_dist.train.signals import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE

from .conftest import NO_TOKENIZER, ROOT, run_process, run_ranks

HELPER = str(ROOT / "tests/helpers/train_with_rank_overrides.py")
STEPS = 10


def layout(world: int) -> list[str]:
    return ["train.micro_batch_size=1", f"train.grad_accum_steps={4 // world}"]


def common(run_dir: Path, shards: Path) -> list[str]:
    return ["--recipe", "tiny_cpu", f"train.max_steps={STEPS}", "train.warmup_steps=2", "checkpoint.save_every_steps=3",
            "logging.log_samples=true", "logging.wandb=disabled", f"logging.output_dir={run_dir}",
            f"data.shards={shards}", NO_TOKENIZER]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]  # a step done again after a resume: the last record counts
    return out


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    """Sample keys of each step's global batch (a micro-batch read again after a resume counted once)."""
    per_micro: dict[tuple[int, int, int], list[str]] = {}
    for f in sorted((run_dir / "samples").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            per_micro[(int(f.stem[4:]), rec["step"], rec["micro"])] = rec["keys"]
    out: dict[int, list[str]] = {}
    for (_rank, step, _micro), keys in per_micro.items():
        out.setdefault(step, []).extend(keys)
    return {s: sorted(k) for s, k in out.items()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_shards):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ranks(2, [*common(run_dir, tiny_shards), *layout(2), "--dump-logits"], timeout=400, script=HELPER)
    return run_dir


def _torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", HELPER, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for(condition, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_kill_minus_nine_then_resume_is_exact(reference_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun([*common(run_dir, tiny_shards), *layout(2)])
    ckpt = run_dir / "checkpoints"
    _wait_for(lambda: (ckpt / "latest").exists(), 300, "the first checkpoint")
    # The ranks are torchrun's direct children (their data-loader workers are the ranks' children).
    ranks = [p for p in psutil.Process(proc.pid).children() if "train_with_rank_overrides" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)  # one rank dies mid-run
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    resumed_from = int((ckpt / "latest").read_text().removeprefix("global_step"))
    assert resumed_from < STEPS
    run_ranks(2, [*common(run_dir, tiny_shards), *layout(2), "checkpoint.resume=auto"], timeout=400, script=HELPER)
    want, got = losses(reference_run), losses(run_dir)
    for step in range(resumed_from + 1, STEPS + 1):
        assert got[step] == want[step], step  # bit for bit
    assert step_keys(run_dir) == step_keys(reference_run)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tiny_shards, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run_dir / "checkpoints")
    manager_view = sorted((run_dir / "checkpoints").glob("global_step*"))
    newest = manager_view[-1]
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HELPER,
         *common(run_dir, tiny_shards), *layout(2), "checkpoint.resume=auto", f"train.max_steps={STEPS + 1}"],
        timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    assert f"checkpoint {newest.name} is damaged" in log and "falling back to the previous one" in log
    assert f"resumed from {manager_view[-2]}" in log


@pytest.mark.parametrize("world", [1, 4])
def test_elastic_resume_on_another_rank_count(reference_run, tiny_shards, tmp_path, world):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / tag_for(6), run_dir / "checkpoints" / tag_for(6))
    run_ranks(world, [*common(run_dir, tiny_shards), *layout(world), "checkpoint.resume=auto"], timeout=500,
              script=HELPER)
    want, got = losses(reference_run), losses(run_dir)
    assert sorted(got) == list(range(7, STEPS + 1))
    for step in got:  # same samples, same weights and optimizer state: equal up to summation order
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    keys_want, keys_got = step_keys(reference_run), step_keys(run_dir)
    for step in range(7, STEPS + 1):
        assert keys_got[step] == keys_want[step]  # nothing skipped, nothing twice


def test_sigusr1_saves_requeues_and_resumes_exactly(reference_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    exe = str(Path(sys.executable).parent / "perceptio-train")
    cmd = [exe, "--nproc-per-node", "2", *common(run_dir, tiny_shards), *layout(2),
           "checkpoint.save_every_steps=0", f"train.max_steps={STEPS}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(
        (run_dir / "metrics.jsonl").read_text().splitlines()) >= 3, 300, "three steps")
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends before a time limit or preemption
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    marker = json.loads((run_dir / "requeue.json").read_text())
    manager = CheckpointManager(run_dir / "checkpoints", dist=None)
    found = manager.find_resumable()
    assert found is not None and found.step == marker["step"] and manager.verify(found.path) is None
    assert read_marker(found.path)["reason"] == "signal SIGUSR1"
    resume = run_process([*cmd, "--resume", "auto"], timeout=400, cwd=ROOT)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert not (run_dir / "requeue.json").exists()
    want, got = losses(reference_run), losses(run_dir)
    assert all(got[s] == want[s] for s in range(1, STEPS + 1))


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_shards, tmp_path, reference_run):
    """A non-finite micro-batch is skipped by every rank and not replaced: every step reads the samples the
    uninterrupted run reads (the skipped one included, it is just not learned from)."""
    ok = tmp_path / "ok"
    run_ranks(2, [*common(ok, tiny_shards), *layout(2), "train.max_steps=4", "--nan-at", "2,5"], timeout=300,
              script=HELPER)
    metrics = [json.loads(line) for line in (ok / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and metrics[-1]["nonfinite_skipped"] == 2
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN reached the weights or the logs
    planned = step_keys(reference_run)
    assert {s: k for s, k in step_keys(ok).items()} == {s: planned[s] for s in range(1, 5)}
    assert losses(ok)[1] == losses(reference_run)[1] and losses(ok)[2] != losses(reference_run)[2]
    bad = tmp_path / "bad"
    proc = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HELPER,
         *common(bad, tiny_shards), *layout(2), "--nan-at", "3,4,5", "train.max_nonfinite_in_a_row=3"],
        timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert f"exitcode  : {NONFINITE_EXIT_CODE}" in proc.stderr + proc.stdout, proc.stderr[-4000:]
    diagnostic = CheckpointManager(bad / "checkpoints", dist=None).find_resumable()
    assert diagnostic is not None
    assert "non-finite" in read_marker(diagnostic.path)["reason"]


def test_export_reloads_with_the_training_models_logits(reference_run, tmp_path):
    from perceptio_dist.export import export_checkpoint, load_exported

    out = export_checkpoint(reference_run / "checkpoints" / tag_for(STEPS), tmp_path / "export")
    model, tokenizer = load_exported(out)
    saved = torch.load(reference_run / "logits.pt", weights_only=True)
    with torch.no_grad():
        result = model(saved["input_ids"], saved["attention_mask"], saved["pixel_values"], saved["sam_images"])
        logits = result.hidden_states @ model.lm_head.weight.t()
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.mask_logits, saved["mask_logits"], rtol=1e-5, atol=1e-5)
    assert "[SEG]" in tokenizer.get_vocab() and (out / "backbone" / "model.safetensors").exists()


def test_eval_of_a_checkpoint_equals_eval_of_its_export(reference_run, tmp_path):
    """perceptio-eval takes a training checkpoint directly (exporting it on the way)."""
    from perceptio_dist.preprocess.scenes.folders import write_scenes
    from perceptio_dist.export import export_checkpoint

    write_scenes(tmp_path / "scenes", 1, seed=70_000, progress=False)
    checkpoint = reference_run / "checkpoints" / tag_for(STEPS)
    export_checkpoint(checkpoint, tmp_path / "export")
    reports = []
    for name, model in (("from_checkpoint", checkpoint), ("from_export", tmp_path / "export")):
        proc = subprocess.run([sys.executable, "-m", "perceptio_dist.cli.eval", "--model", str(model), "--out",
                               str(tmp_path / name), "--synthetic-scenes", str(tmp_path / "scenes"), "--limit", "1",
                               "--max-new-tokens", "24"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append((tmp_path / name / "predictions.jsonl").read_text())
    assert reports[0] == reports[1] and reports[0]


def test_resume_refuses_a_checkpoint_of_another_model(reference_run, tiny_shards, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / tag_for(6), run_dir / "checkpoints" / tag_for(6))
    proc = subprocess.run(
        [sys.executable, "-m", "perceptio_dist.train", *common(run_dir, tiny_shards), *layout(1),
         "checkpoint.resume=auto", "model.seg_head.mlp_hidden_size=7"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a different model" in proc.stderr and "mlp_hidden_size" in proc.stderr


@pytest.mark.parametrize("change,words", [("data.seed=999", "data.seed was 1234, now 999"),
                                          ("train.micro_batch_size=2", "global batch")])
def test_resume_with_another_data_order_is_one_paragraph_and_leaves_the_run_folder_alone(
        reference_run, tiny_shards, tmp_path, change, words):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / tag_for(6), run_dir / "checkpoints" / tag_for(6))
    (run_dir / "config.yaml").write_text("the interrupted run's config\n")
    proc = subprocess.run(
        [sys.executable, "-m", "perceptio_dist.train", *common(run_dir, tiny_shards), *layout(1),
         "checkpoint.resume=auto", change],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    paragraph = [line for line in proc.stderr.splitlines() if line.startswith("Config error")]
    assert len(paragraph) == 1 and words in paragraph[0] and "logging.output_dir" in paragraph[0]
    assert (run_dir / "config.yaml").read_text() == "the interrupted run's config\n"
