"""tools/bench_trainer.py compares like with like: its plain PyTorch baseline trains the model perceptio-train trains,
on the same batches with the same objective, so the ratio it prints is the stack's cost and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT, read_metrics, tools_module


def test_plain_baseline_takes_the_steps_perceptio_train_takes_with_accumulation(tmp_path, tiny_shards):
    bench = tools_module("bench_trainer")
    bench.MICRO, bench.ACCUM, bench.TEXT_WIDTH = 2, 2, 64
    steps = 4
    run = bench.run_trainer(tiny_shards, steps, tmp_path / "zero2", 1, *bench.ZERO2)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_trainer.py"), "--plain-worker", "--shards",
                           str(tiny_shards), "--steps", str(steps), "--warmup", "1", "--threads", "1", "--micro", "2",
                           "--accum", "2", "--text-width", "64", "--out", str(tmp_path / "plain")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])["losses"]
    trained = [record["loss"] for record in read_metrics(run)]
    assert len(plain) == len(trained) == steps
    # The same step losses, including after three updates: same weights, batches, step normaliser, accumulation
    # (a baseline that normalised each micro-batch on its own, or skipped the 1/accum, is off from step 1).
    for got, want in zip(plain, trained):
        assert abs(got - want) <= 1e-6 * abs(want), (plain, trained)
    assert len(set(trained)) == steps  # the steps differ, so the comparison covers updates
