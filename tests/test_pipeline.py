"""Pipeline parallelism (parallel.mode=pipeline): DeepSpeed's PipelineModule with ZeRO-1, on CPU ranks over gloo.

The reference is a ZeRO-3 run on the same data and seed. It builds the model whole and lets DeepSpeed
partition it (parallel.zero_init=false): under deepspeed.zero.Init the backbone's random initialisation
draws differently, so its first loss differs (by ~0.1% on the tiny model) although nothing else does.
Stated tolerance: per-step losses within 1e-5 relative for all six steps (observed: bit-identical).
Global batch 4 everywhere: ZeRO-3 2 ranks x accum 1 x micro 2; pipeline 2 stages x 1 replica x accum 2;
2 stages x 2 replicas x accum 1. The loader deals the same samples into the same micro-batches in all three.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.train.checkpoint import tag_for

from .conftest import NO_TOKENIZER, ROOT, read_metrics, run_ranks

STEPS = 6
PIPELINE = ["parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.deepspeed_config=ds_configs/pipeline.json",
            "parallel.pp_stages=2"]
TERMS = ("text", "marker", "token", "count", "reconstruction", "mask", "z_loss")


def common(run_dir: Path, shards: Path, steps: int = STEPS) -> list[str]:
    return ["--recipe", "tiny_cpu", f"train.max_steps={steps}", "train.warmup_steps=1", "logging.wandb=disabled",
            "logging.log_samples=true", f"logging.output_dir={run_dir}", f"data.shards={shards}", NO_TOKENIZER]


def train(run_dir: Path, nproc: int, shards: Path, *overrides: str, steps: int = STEPS) -> list[dict]:
    run_ranks(nproc, [*common(run_dir, shards, steps), *overrides], timeout=600)
    return read_metrics(run_dir)


def step_keys(run_dir: Path, ranks: list[int]) -> dict[int, list[str]]:
    """Sample keys of each step, read from the given ranks' sample logs (one stage, so each sample once)."""
    out: dict[int, list[str]] = {}
    for rank in ranks:
        for line in (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["keys"])
    return {s: sorted(k) for s, k in out.items()}


def assert_same_training(run: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in run] == [m["step"] for m in reference]
    for ours, ref in zip(run, reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5), ours["step"]
        for term in TERMS:
            key = f"loss/{term}"
            if ref[key] is None:
                assert ours[key] is None
            else:
                assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (ours["step"], term)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    train(run_dir, 2, tiny_shards, "parallel.zero_init=false", "checkpoint.save_every_steps=3")
    return run_dir


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, tiny_shards) -> Path:
    """2 ranks as 2 stages, one decoder layer each (so a decoder layer runs on both sides of the cut)."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    train(run_dir, 2, tiny_shards, *PIPELINE, "train.grad_accum_steps=2", "parallel.pp_layers_per_stage=[1,1]",
          "checkpoint.save_every_steps=3")
    return run_dir


def test_two_stages_train_like_zero3(zero3_run, two_stage_run, tiny_cfg):
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer

    assert_same_training(read_metrics(two_stage_run), read_metrics(zero3_run))
    assert step_keys(two_stage_run, [0]) == step_keys(zero3_run, [0, 1])
    summary = json.loads((two_stage_run / "summary.json").read_text())
    stages = summary["pipeline_stages"]
    assert [s["kinds"] for s in stages] == [["embed", "vision", "decoder:0"], ["decoder:1", "head"]]
    model = build_perceptio(tiny_cfg.model, load_tokenizer(tiny_cfg.model.backbone))
    assert sum(s["parameters"] for s in stages) == sum(p.numel() for p in model.parameters())
    assert all(s["parameters"] > 0 for s in stages)


def test_four_ranks_as_two_stages_times_two_replicas_train_like_zero3(zero3_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    # Stages balanced by parameters (the default); activation checkpointing on (recomputation changes no value).
    run = train(run_dir, 4, tiny_shards, *PIPELINE, "train.activation_checkpointing=true")
    assert_same_training(run, read_metrics(zero3_run))
    assert step_keys(run_dir, [0, 1]) == step_keys(zero3_run, [0, 1])  # ranks 0 and 1: stage 0's two replicas
    stages = json.loads((run_dir / "summary.json").read_text())["pipeline_stages"]
    assert stages[0]["kinds"][:2] == ["embed", "vision"] and stages[-1]["kinds"][-1] == "head"


def test_a_middle_stage_reads_no_batches_and_three_stages_train_like_zero3(zero3_run, tiny_shards, tmp_path):
    """3 ranks as 3 stages: the middle stage receives activations only, so it reads (and builds) no micro-batch and
    its loader starts no worker; the step's items are counted once, by the last stage."""
    run_dir = tmp_path / "run"
    run = train(run_dir, 3, tiny_shards, *PIPELINE[:3], "parallel.pp_stages=3", "train.grad_accum_steps=2",
                "parallel.pp_layers_per_stage=[0,1,1]")
    assert_same_training(run, read_metrics(zero3_run))
    assert step_keys(run_dir, [0]) == step_keys(run_dir, [2]) == step_keys(zero3_run, [0, 1])
    final = sorted((run_dir / "checkpoints").glob("global_step*"))[-1]
    positions = [torch.load(final / f"rank{r:05d}_state.pt", weights_only=True)["loader"]["position"]
                 for r in range(3)]
    assert positions == [STEPS * 2, 0, STEPS * 2]  # micro-batches read by each stage
    stages = json.loads((run_dir / "summary.json").read_text())["pipeline_stages"]
    assert [s["kinds"] for s in stages] == [["embed", "vision"], ["decoder:0"], ["decoder:1", "head"]]


def test_tied_embeddings_are_shared_between_first_and_last_stage(tiny_shards, tmp_path):
    tied = "model.backbone.tie_word_embeddings=true"
    reference = train(tmp_path / "zero3", 2, tiny_shards, tied, "parallel.zero_init=false", steps=3)
    run = train(tmp_path / "pipe", 2, tiny_shards, tied, *PIPELINE, "train.grad_accum_steps=2", steps=3)
    assert_same_training(run, reference)
    stages = json.loads((tmp_path / "pipe" / "summary.json").read_text())["pipeline_stages"]
    assert stages[-1]["kinds"][-2:] == ["tied_embed", "head"]
    from perceptio_dist.export import export_checkpoint, load_exported

    model, _ = load_exported(export_checkpoint(tmp_path / "pipe" / "checkpoints" / tag_for(3), tmp_path / "export"))
    reference, _ = load_exported(export_checkpoint(tmp_path / "zero3" / "checkpoints" / tag_for(3), tmp_path / "ref"))
    assert model.lm_head.weight is model.backbone.model.language_model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=1e-4, atol=2e-5)


def test_pipeline_resume_is_exact(two_stage_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = two_stage_run / "checkpoints" / tag_for(3)
    assert sorted(p.name for p in checkpoint.glob("layer_*")) == [f"layer_0{i}-model_states.pt" for i in range(5)]
    train(run_dir, 2, tiny_shards, *PIPELINE, "train.grad_accum_steps=2", "parallel.pp_layers_per_stage=[1,1]",
          f"checkpoint.resume={checkpoint}")
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in read_metrics(two_stage_run)[3:]]  # bit-identical


def test_pipeline_checkpoint_exports_the_same_model_as_zero3(zero3_run, two_stage_run, tmp_path):
    from safetensors.torch import load_file

    from perceptio_dist.export import export_checkpoint, load_exported

    folders = {}
    for name, run in (("zero3", zero3_run), ("pipeline", two_stage_run)):
        folders[name] = export_checkpoint(run / "checkpoints" / tag_for(STEPS), tmp_path / name)
    # The runs' losses agree to the last bit, their weights to ~5e-6: gradient sums and the clipping norm are
    # reduced in another order. Attention key biases are left out: they cancel in the softmax, their exact
    # gradient is 0, and Adam blows the rounding noise in it up to lr-sized steps (seen: up to 7e-5).
    for rel in ("backbone/model.safetensors", "seg_head.safetensors", "depth_vqvae.safetensors"):
        ours, ref = load_file(str(folders["pipeline"] / rel)), load_file(str(folders["zero3"] / rel))
        assert ours.keys() == ref.keys(), rel
        for key in ref:
            if not key.endswith("k_proj.bias"):
                torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=2e-5, msg=f"{rel}: {key}")
    model, _ = load_exported(folders["pipeline"])
    assert model.backbone.model.language_model.layers[1].mlp.up_proj.weight.abs().sum() > 0


def test_a_pipeline_checkpoint_refuses_another_layout(two_stage_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_stage_run / "checkpoints" / tag_for(3), run_dir / "checkpoints" / tag_for(3))
    proc = subprocess.run([sys.executable, "-m", "perceptio_dist.train", *common(run_dir, tiny_shards),
                           "train.grad_accum_steps=4", "parallel.zero_stage=2",
                           "parallel.deepspeed_config=ds_configs/zero2.json", "checkpoint.resume=auto"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "another parallel layout" in proc.stderr and "parallel.mode: checkpoint 'pipeline', now 'zero'" in proc.stderr


# ------------------------------------------------------------------------------------ config and layout


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.mode=pipeline", "parallel.pp_stages=2"], "set parallel.zero_stage=1"),
    (["parallel.mode=pipeline", "parallel.zero_stage=1"], "at least 2 stages"),
    (["parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.pp_stages=4"], "only 2 decoder layers"),
    (["parallel.mode=pipeline", "parallel.zero_stage=1", "parallel.pp_stages=2", "parallel.pp_layers_per_stage=[1,2]"],
     "summing to model.backbone.text.num_layers=2"),
    (["parallel.pp_stages=2"], "need parallel.mode=pipeline"),
    (["parallel.zero_stage=1"], "mode 'zero' runs ZeRO-2 or ZeRO-3"),
])
def test_pipeline_config_mistakes_are_explained(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_config("tiny_cpu", overrides)


def test_deepspeed_config_of_a_pipeline(tmp_path):
    from perceptio_dist.parallel.deepspeed_config import build_deepspeed_config

    cfg = load_config("tiny_cpu", [*PIPELINE[:3], "parallel.pp_stages=2", "train.grad_accum_steps=3"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 2  # micro x accum x replicas (4 ranks / 2 stages)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert cfg.parallel.layout(4).replicas == 2
    with pytest.raises(ConfigError, match="3 ranks cannot be split into 2 pipeline stages"):
        cfg.parallel.layout(3).replicas
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"pipeline": {"activation_checkpoint_interval": 1}}))
    cfg = load_config("tiny_cpu", [*PIPELINE[:2], "parallel.pp_stages=2", f"parallel.deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match="train.activation_checkpointing=true"):
        build_deepspeed_config(cfg, world_size=2)


def _cfg_with_layers(num_layers: int, *overrides: str):
    return load_config("tiny_cpu", [f"model.backbone.text.num_layers={num_layers}", *PIPELINE[:3], *overrides])


def test_stage_bounds_by_hand():
    from perceptio_dist.parallel.pipeline import layer_kinds, stage_bounds

    # untied, 4 decoder layers: [embed, vision, d0, d1, d2, d3, head] = 7 layers
    params = [10, 10, 5, 5, 5, 5, 20]
    explicit = _cfg_with_layers(4, "parallel.pp_stages=2", "parallel.pp_layers_per_stage=[1,3]")
    assert stage_bounds(explicit, params) == [0, 3, 7]
    # units [embed+vision=20, 5, 5, 5, 5, head=20]: 30 | 30 by parameters
    assert stage_bounds(_cfg_with_layers(4, "parallel.pp_stages=2"), params) == [0, 4, 7]
    # uniform over 6 units in 3 stages: 2 units each -> decoders 1, 2, 1
    uniform = _cfg_with_layers(4, "parallel.pp_stages=3", "parallel.pp_partition=uniform")
    assert stage_bounds(uniform, params) == [0, 3, 5, 7]
    # tied: the last stage also holds the tied embedding (8 layers)
    assert len(layer_kinds(4, tied=True)) == 8
    assert stage_bounds(explicit, [10, 10, 5, 5, 5, 5, 0, 20]) == [0, 3, 8]


def test_the_8b_pipeline_recipe_is_the_8b_recipe_cut_into_stages():
    zero, pipe = load_config("perceptio_8b").to_dict(), load_config("perceptio_8b_pipeline").to_dict()
    assert pipe["model"] == zero["model"] and pipe["data"] == zero["data"] and pipe["objective"] == zero["objective"]
    assert pipe["parallel"]["mode"] == "pipeline" and pipe["parallel"]["zero_stage"] == 1
    assert {k for k in pipe["train"] if pipe["train"][k] != zero["train"][k]} == {"grad_accum_steps"}


def test_planner_uses_the_trainers_split_for_the_recipe():
    from perceptio_dist.parallel.pipeline import split_layers
    from perceptio_dist.plan import model_sizes, split_stages

    sizes = model_sizes(load_config("perceptio_8b_pipeline"))
    split = split_stages(sizes.blocks, 2)
    bounds = split_layers([b.trainable for b in sizes.blocks], 32, 2)
    assert [len(stage) for stage in split] == [bounds[1] - bounds[0], bounds[2] - bounds[1]]
    exe = [sys.executable, "-m", "perceptio_dist.cli.plan"]
    proc = subprocess.run([*exe, "--recipe", "perceptio_8b_pipeline", "--nodes", "2",
                           "parallel.pp_layers_per_stage=[14,18]"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| pp2xzero1 |" in proc.stdout and "decoder layers per stage [14, 18]" in proc.stdout


def test_launcher_refuses_a_rank_count_the_stages_do_not_divide(tiny_shards, tmp_path):
    exe = shutil.which("perceptio-train", path=str(Path(sys.executable).parent))
    proc = subprocess.run([exe, "--nproc-per-node", "3", *common(tmp_path / "run", tiny_shards), *PIPELINE],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "3 ranks cannot be split into 2 pipeline stages" in proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before torchrun started any rank
