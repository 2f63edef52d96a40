"""The stack's own cost: perceptio-train's step time against a plain PyTorch loop over the same model, objective and
batches, and the checkpoint save time as a share of step time, in one run.

    python tools/bench_trainer.py [--steps 30] [--micro 2] [--accum 1] [--text-width 256] [--engine-stages 0,2,3]
                                  [--shards DIR]

Both sides run in fresh processes on one CPU rank with the same threads, the same recipe (the tiny one, with a
language model of 256 x 4 layers so that compute, not bookkeeping, dominates a step as it does at 8B), the same
shards and the same ShardLoader (the plain loop iterates it too), fp32:

* plain loop (the baseline): ``build_perceptio`` + the training module (model and objective, the recipe's LM-head
  back end), torch AdamW with the trainer's parameter groups and schedule, gradient clipping; per step: the step's
  ``--accum`` micro-batches and their step normaliser (as the trainer sets it), forward and backward of each, clip,
  step. No DeepSpeed, no metrics, no checks. Its step losses are printed against perceptio-train ZeRO-2's (they
  agree: the same model, objective and batches; tests/test_bench_trainer.py checks it).
* the same loop through a DeepSpeed engine built from the trainer's own DeepSpeed config, at each ZeRO stage of
  ``--engine-stages`` (0: DeepSpeed's data-parallel engine without ZeRO; 2 and 3: what perceptio-train's ZeRO-2 and
  ZeRO-3 run): what DeepSpeed costs on its own, and how much of it is ZeRO's partitioning;
* perceptio-train: ``python -m perceptio_dist.train`` on 1 rank (a world of one), ZeRO-2 and ZeRO-3 (with the 8B
  recipe's ZeRO-3 JSON), with its metrics.jsonl, finiteness agreement, step normaliser and progress bar; its step
  time is the logged step_time_s.

Every cost DeepSpeed adds (gradient hooks and bucket copies each micro-batch, flat-buffer updates each step; ZeRO-3's
gathers and releases around every module) is per parameter or per module, while compute is per parameter and token:
the ratio falls as the real tokens of an optimizer step grow, so it is printed with them. The 8B recipe's step is
micro-batch 1 x accumulation 2 of 400-3,600 tokens: 800-7,200 tokens a rank.

The first ``--warmup`` steps of each are left out; each loop runs ``--repeats`` times, interleaved with the others,
and its best median step time counts (this 2-core machine's speed varies by tens of percent between minutes). The
checkpoint figure comes from a ZeRO-3 run saving every 5 steps: the median save time (all of CheckpointManager.save:
the engine's files, the marker, checksums, the barrier) over the step time, at the 8B recipe's interval, and the
interval at which saving costs 1 %. Builds its own shards (rendered scenes, the tiny preprocessing: 24, or twice the
samples of a step) unless given ``--shards``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def text_model(width: int) -> list[str]:
    """The language model: ``width`` wide, 4 layers, 8 heads, an MLP 688 wide per 256 of width."""
    return [f"model.backbone.text.hidden_size={width}", "model.backbone.text.num_layers=4",
            "model.backbone.text.num_heads=8", "model.backbone.text.num_kv_heads=4",
            f"model.backbone.text.intermediate_size={688 * width // 256}"]


MODEL = ["model.depth_vqvae.checkpoint=null", "train.precision=fp32", "data.num_workers=1",
         "logging.wandb=disabled", "logging.progress_bar=false"]


def build_shards(folder: Path, num_scenes: int) -> Path:
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    write_scenes(folder / "scenes", num_scenes, progress=False)
    subprocess.run([sys.executable, "-m", "ray_jobs.preprocess", "--config", "preprocess_tiny",
                    f"sources.0.path={folder / 'scenes'}", f"output_dir={folder / 'shards'}", "shard_size=8",
                    "depth_vqvae.checkpoint=null"], cwd=ROOT, check=True, capture_output=True, text=True)
    return folder / "shards"


# perceptio-train's ZeRO stages as users configure them: ZeRO-2's JSON, and ZeRO-3's of the 8B recipe (parameters
# under 10 x hidden stay whole; the tiny recipe's own ZeRO-3 JSON partitions every one, to exercise it in tests).
ZERO2 = ("parallel.zero_stage=2", "parallel.deepspeed_config=ds_configs/zero2.json")
ZERO3 = ("parallel.zero_stage=3", "parallel.deepspeed_config=ds_configs/zero3.json")

MICRO = 2  # samples per micro-batch (set from --micro)
ACCUM = 1  # micro-batches per optimizer step (set from --accum; the 8B recipe accumulates 2)
TEXT_WIDTH = 256  # the language model's width (set from --text-width)


def overrides(shards: Path, steps: int, out: Path, *extra: str) -> list[str]:
    return [*text_model(TEXT_WIDTH), *MODEL, f"data.shards={shards}", f"train.max_steps={steps}",
            "train.warmup_steps=2",
            f"train.micro_batch_size={MICRO}", f"train.grad_accum_steps={ACCUM}",
            f"logging.output_dir={out}", "checkpoint.save_final=false", *extra]


def training_setup(args_overrides: list[str]):
    """(config, training module, optimizer, schedule, batch iterator): what both baselines train, as the trainer builds
    it (same seed, model, objective, LM-head back end, parameter groups, loader)."""
    import torch

    from perceptio_dist.config.training import load_config
    from perceptio_dist.data.training_data import build_loader
    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer
    from perceptio_dist.parallel.zero import PerceptioTrainingModule
    from perceptio_dist.train.optim import build_optimizer
    from perceptio_dist.train.trainer import seed_everything

    cfg = load_config("tiny_cpu", args_overrides)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.backbone)
    model = build_perceptio(cfg.model, tokenizer, torch.float32, seed=cfg.train.seed).train()
    module = PerceptioTrainingModule(model, PerceptioObjective(cfg.objective, model.token_ids),
                                     LMHeadTermsModule.from_config(cfg.objective, torch.device("cpu")))  # CPU back end
    optimizer, scheduler = build_optimizer(module, cfg.train)
    return cfg, module, optimizer, scheduler, iter(build_loader(cfg, tokenizer, model.token_ids, rank=0, world_size=1))


def step_normalised(module, micro_batches: list):
    """The context a step of ``micro_batches`` on one rank runs in, as the trainer's: every term is the mean over the
    step's items, scaled so that averaging the micro-batch losses gives the step's objective."""
    from perceptio_dist.losses.objective import StepNormaliser

    counts = module.objective.step_counts(micro_batches, micro_batches[0].input_ids.device)
    return module.objective.normalised_by(StepNormaliser(counts.cpu(), scale=float(len(micro_batches))))


def plain_step(module, optimizer, scheduler, micro_batches: list, grad_clip: float):
    """One optimizer step of the plain PyTorch baseline over ``micro_batches`` (also gpu_check's): forward and
    backward of each, their losses averaged as DeepSpeed averages accumulation steps, then clip, update, schedule.
    Returns the step's loss (what perceptio-train logs as ``loss``)."""
    import torch

    total = 0.0
    with step_normalised(module, micro_batches):
        for batch in micro_batches:
            loss, _, _ = module(**batch.as_dict())
            (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
    torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def plain_loop(args_overrides: list[str], steps: int, warmup: int) -> dict:
    """The baseline, in this (fresh) process."""
    cfg, module, optimizer, scheduler, batches = training_setup(args_overrides)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        losses.append(float(plain_step(module, optimizer, scheduler, micro_batches, cfg.train.grad_clip)))
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:]), "losses": losses}


def deepspeed_loop(args_overrides: list[str], steps: int, warmup: int, stage: int) -> dict:
    """The plain loop's steps through a DeepSpeed engine built from the trainer's own DeepSpeed config (1 rank) with
    its ZeRO stage set to ``stage`` (3: the trainer's ZeRO-3 JSON, the module partitioned by the engine, its shared
    LM-head weight registered as the trainer registers it): what DeepSpeed costs, without the trainer around it."""
    import deepspeed

    from perceptio_dist.parallel.deepspeed_config import build_deepspeed_config
    from perceptio_dist.parallel.distributed import init_distributed

    init_distributed("gloo")  # a world of one, set up as the trainer sets it up
    cfg, module, optimizer, scheduler, batches = training_setup(args_overrides)
    ds_config = build_deepspeed_config(cfg, 1)
    ds_config["zero_optimization"]["stage"] = stage  # mode zero's config is for 2-3; the engine takes any
    if stage == 3:
        from perceptio_dist.parallel.zero import register_external_parameters

        register_external_parameters(module.external_parameters())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        with step_normalised(module, micro_batches):
            for batch in micro_batches:
                loss, _, _ = engine(**batch.as_dict())
                engine.backward(loss)
                engine.step()  # an update at the accumulation boundary only
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:])}


def run_trainer(shards: Path, steps: int, out: Path, threads: int, *extra: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "perceptio_dist.train", "--recipe", "tiny_cpu",
                           *overrides(shards, steps, out, *extra)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"perceptio-train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def metrics_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainer_step_s(run_dir: Path, warmup: int) -> float:
    return statistics.median(r["step_time_s"] for r in metrics_records(run_dir)[warmup:])


def engine_loop_name(stage: int) -> str:
    return f"the same loop through a DeepSpeed engine, ZeRO stage {stage}"


def parse_stages(text: str) -> list[int]:
    try:
        stages = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        stages = []
    if not stages or any(stage not in (0, 1, 2, 3) for stage in stages):
        raise argparse.ArgumentTypeError(f"--engine-stages takes ZeRO stages out of 0-3, comma-separated, not {text!r}")
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shards", type=Path, default=None, help="tiny-recipe shards (default: built here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best median counts")
    parser.add_argument("--micro", type=int, default=2,
                        help="samples per micro-batch (the tiny recipe's micro-batch: 2)")
    parser.add_argument("--accum", type=int, default=1,
                        help="micro-batches per optimizer step (the 8B recipe accumulates 2)")
    parser.add_argument("--text-width", type=int, default=256,
                        help="the language model's width (4 layers; the MLP scales with it)")
    parser.add_argument("--engine-stages", type=parse_stages, default=[0, 2, 3],
                        help="ZeRO stages of the bare DeepSpeed-engine loop, comma-separated (default 0,2)")
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 3")
    if args.micro < 1 or args.accum < 1:
        parser.error("--micro and --accum must be positive")
    if args.text_width < 8 or args.text_width % 8:
        parser.error("--text-width must be a positive multiple of 8 (8 heads)")
    global MICRO, ACCUM, TEXT_WIDTH
    MICRO, ACCUM, TEXT_WIDTH = args.micro, args.accum, args.text_width
    if args.plain_worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(plain_loop(overrides(args.shards, args.steps, args.out), args.steps, args.warmup)))
        return
    if args.deepspeed_worker is not None:
        import torch

        torch.set_num_threads(args.threads)
        zero = ZERO3 if args.deepspeed_worker == 3 else ZERO2
        print(json.dumps(deepspeed_loop(overrides(args.shards, args.steps, args.out, *zero),
                                        args.steps, args.warmup, args.deepspeed_worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # a scene gives one sample of each task, and the loader needs a step's samples of every task
        shards = args.shards or build_shards(tmp / "data", max(24, 2 * args.micro * args.accum))
        print(f"shards: {shards}", flush=True)
        workers = [(["--plain-worker"], "plain PyTorch loop (AdamW, no DeepSpeed)")]
        workers += [(["--deepspeed-worker", str(stage)], engine_loop_name(stage)) for stage in args.engine_stages]
        trainers = ["perceptio-train, ZeRO-2, 1 rank", "perceptio-train, ZeRO-3, 1 rank"]
        medians: dict[str, list[float]] = {name: [] for name in [*(n for _, n in workers), *trainers]}
        plain_losses: list[float] = []
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits every loop alike
            for flags, name in workers:
                proc = subprocess.run([sys.executable, __file__, *flags, "--shards", str(shards), "--steps",
                                       str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                                       "--micro", str(args.micro), "--accum", str(args.accum),
                                       "--text-width", str(args.text_width),
                                       "--out", str(tmp / "plain")], cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                if proc.returncode:
                    sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                medians[name].append(result["step_s"])
                plain_losses = result.get("losses", plain_losses)
            zero2 = run_trainer(shards, args.steps, tmp / f"zero2_{repeat}", args.threads, *ZERO2)
            medians[trainers[0]].append(trainer_step_s(zero2, args.warmup))
            zero3 = run_trainer(shards, args.steps, tmp / f"zero3_{repeat}", args.threads, *ZERO3)
            medians[trainers[1]].append(trainer_step_s(zero3, args.warmup))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{v[-1]:.4f}" for v in medians.values()), flush=True)
        rows = [(n, min(v)) for n, v in medians.items()]
        plain = rows[0][1]
        trainer_records = metrics_records(zero2)
        tokens = statistics.median(r["tokens"] for r in trainer_records)
        loss_gap = max(abs(r["loss"] - x) / abs(x) for r, x in zip(trainer_records, plain_losses))
        saving = run_trainer(shards, args.steps, tmp / "saving", args.threads, *ZERO3, "checkpoint.save_every_steps=5")
        saves = json.loads((saving / "summary.json").read_text())["checkpoint_saves"]
        save_s = statistics.median(s["seconds"] for s in saves)
        save_run_step = trainer_step_s(saving, args.warmup)
    print(f"micro-batch {args.micro} samples x accumulation {args.accum}: {tokens:.0f} real tokens per optimizer "
          f"step (median), text {args.text_width} wide x 4 layers, {args.steps} steps ({args.warmup} left out), "
          f"{args.threads} threads")
    print(f"same model, objective and batches: the plain loop's and perceptio-train ZeRO-2's step losses differ by at "
          f"most {loss_gap:.1e} relative over {len(plain_losses)} steps")
    print(f"best of {args.repeats} interleaved repeats of each loop's median step time")
    print("| loop | step time s | vs plain loop |")
    print("| --- | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {seconds / plain:.3f}x |")
    for stage, trainer in ((2, trainers[0]), (3, trainers[1])):
        engine = medians.get(engine_loop_name(stage))
        if engine:
            print(f"perceptio-train ZeRO-{stage} over the bare ZeRO-{stage} engine loop (what the stack adds to "
                  f"DeepSpeed): {min(medians[trainer]) / min(engine):.3f}x")
    from perceptio_dist.config.training import load_config

    interval = load_config("perceptio_8b", []).checkpoint.save_every_steps
    step = save_run_step
    print(f"\ncheckpoint save (ZeRO-3 as the 8B recipe configures it, 1 rank, median of {len(saves)}; that run's "
          f"median step {step:.4f} s): "
          f"{save_s:.3f} s = {save_s / step:.1f} steps; "
          f"every {interval} steps (the 8B recipe's interval) that is {save_s / (interval * step):.2%} of step time; "
          f"1 % is reached at an interval of {save_s / (0.01 * step):.0f} steps")


if __name__ == "__main__":
    main()
