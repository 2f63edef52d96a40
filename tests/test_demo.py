"""The main job's quick mode end to end: every stage leaves its outputs, and a second run reuses them.

It runs from the shell a cluster user has inside an interactive allocation (OMP_NUM_THREADS=1, an empty
CUDA_VISIBLE_DEVICES, the outer job's SLURM_* variables): none of it may change what the demo does."""

from __future__ import annotations

import json
import os
import sys

import pytest

from .conftest import CLUSTER_SHELL, ROOT, run_process, without_launcher_variables

STAGES = ("scenes", "tokenizer", "shards", "train", "ablation", "evaluate", "report")


def test_quick_demo_runs_every_stage_then_reuses_them(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "perceptio_dist.cli.demo", "--quick", "--out", str(out)]
    env = {**without_launcher_variables(dict(os.environ)), **CLUSTER_SHELL}
    first = run_process(cmd, timeout=1500, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    assert len(list((out / "scenes").glob("scene_*/meta.json"))) == 12
    assert len(list((out / "heldout_scenes").glob("scene_*/meta.json"))) == 3
    assert (out / "depth_vqvae" / "tokenizer.safetensors").exists()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0
    assert "succeeded" in (out / "logs" / "preprocess.log").read_text()  # through `ray job submit`
    for name in ("depth_model", "ablation"):
        run = out / name
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 7))
        tags = sorted(p.name for p in (run / "checkpoints").glob("global_step*") if p.is_dir())
        assert tags == ["global_step00000003", "global_step00000006"]  # midway and final
        assert (run / "export" / "perceptio.yaml").exists()
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert "synthetic_refer" in metrics and any(k.startswith("synthetic_depth_") for k in metrics)
    # the toy world: evaluation asks the questions the way training did, and the mean map is there to compare
    questions = json.loads((out / "depth_model" / "export" / "questions.json").read_text())
    assert questions["marker_style"] == "colour" and questions["marker_grid"] == 8
    assert (out / "depth_model" / "export" / "mean_depth.npy").exists()
    ablation_config = (out / "ablation" / "config.yaml").read_text()
    assert "depth_tokens: false" in ablation_config
    predictions = [json.loads(line) for line in (out / "ablation" / "eval" / "predictions.jsonl").read_text()
                   .splitlines()]
    assert all(p["depth_codes"] is None for p in predictions)  # the ablation never writes a depth block
    report = (out / "report.md").read_text()
    assert "| with depth tokens | without (ablation) |" in report and (out / "loss_curves.png").stat().st_size
    assert "## Depth model: does the answer use the depth chain?" in report  # interventions and consistency
    assert "## Do the generated depth maps follow the image?" in report
    for line in report.splitlines():
        if line.startswith("![") and "(" in line:
            assert (out / line[line.index("(") + 1:-1]).exists(), line

    second = run_process(cmd, timeout=600, cwd=ROOT, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage}: done in an earlier run" in second.stdout, stage


def test_the_demo_report_tables_its_runs_metrics_and_draws_their_losses(tmp_path):
    """The report from the two runs' metrics alone: one row per benchmark and metric, both models side by side,
    a dash where a model has no figure, and the loss curves drawn from metrics.jsonl."""
    from perceptio_dist.experiments.toy.demo import write_demo_report

    out = tmp_path / "demo"
    metrics = {"depth_model": {"synthetic_depth_3": {"accuracy": 0.5, "count": 12, "accuracy_ci": [0.25, 0.75]},
                               "synthetic_refer": {"ciou": 0.25, "giou": 0.125, "count": 4}},
               "ablation": {"synthetic_depth_3": {"accuracy": 0.75, "count": 12, "accuracy_ci": [0.5, 0.9]}}}
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(metrics))
    # The same 12 items: the depth model right on the first 6, the ablation on items 3-11: 3 items only the
    # depth model gets, 6 only the ablation: -25 points, McNemar p = 2 (1 + 9 + 36 + 84) / 2^9 = 0.508.
    verdicts = {"depth_model": [i < 6 for i in range(12)], "ablation": [i >= 3 for i in range(12)]}
    for name, losses in (("depth_model", [3.0, 2.0]), ("ablation", [3.5, 2.5])):
        (out / name / "eval").mkdir(parents=True)
        (out / name / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v, "loss/text": v / 2})
                                                          + "\n" for i, v in enumerate(losses)))
        (out / name / "eval" / "predictions.jsonl").write_text("".join(
            json.dumps({"group": "synthetic_depth_3", "key": f"k{i}", "correct": ok}) + "\n"
            for i, ok in enumerate(verdicts[name])))
    report = write_demo_report(out).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| synthetic_depth_3 | accuracy |"))
    assert row.startswith("| synthetic_depth_3 | accuracy | 50.0 [25.0, 75.0] | 75.0 [50.0, 90.0] | 12 | -25.0 [")
    assert row.endswith(", p 0.51 (12) |")
    assert "| synthetic_refer | ciou | 25.0 | - | 4 | – |" in report
    assert "| synthetic_refer | giou | 12.5 | - | 4 | – |" in report
    assert (out / "loss_curves.png").stat().st_size > 1000 and "![losses](loss_curves.png)" in report
