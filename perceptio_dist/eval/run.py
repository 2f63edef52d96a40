"""perceptio-eval: score an exported model on the benchmarks, over one or several ranks.

    perceptio-eval --model runs/tiny_cpu/export --out runs/tiny_cpu/eval \\
        --hardblink ../shared/data/hardblink --synthetic-scenes runs/heldout_scenes
    torchrun --nproc_per_node 2 -m perceptio_dist.cli.eval --model ... --out ...   # items split over ranks

Writes, on rank 0: metrics.json (per group: accuracy or cIoU/gIoU and the count; HardBLINK's mean of
the 3/4/5-point accuracies), predictions.jsonl (one line per item, in item order whatever the rank
count; the results are identical for any rank count at the same thread count per process, because
ranks take whole global batches) and report.md with a picture per benchmark group: image, predicted mask against the reference,
decoded depth map, question, answer and whether it was right.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .benchmarks import (CIRCULAR_GROUP, CIRCULAR_SEPARATOR, EvalItem, hardblink_items, mmbench_items,
                         refcoco_items, synthetic_items)
from .depth_dependence import MEAN_DEPTH_FILE
from .faithfulness import intervene
from .generate import GenerationSettings
from .metrics import score, summary_line
from .predict import plan_batches, predict
from .report import write_report

log = logging.getLogger("perceptio_dist.eval")
EXIT_USAGE = 2


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how (perceptio-eval's options, cli/eval.py)."""

    model: str  # an exported folder or a complete training checkpoint
    out: str  # the report folder
    hardblink: str | None = None
    synthetic_scenes: str | None = None
    refcoco: str | None = None
    refcoco_dataset: str = "refcoco"
    refcoco_split_by: str = "unc"
    refcoco_splits: tuple[str, ...] = ("val", "testA", "testB")
    refcoco_images: str | None = None
    mmbench: str | None = None
    mmbench_circular: bool = False
    limit: int | None = None  # items per group
    batch_size: int = 4
    depth_policy: str = "auto"
    max_new_tokens: int = 160
    interventions: bool = True
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    device: str = "auto"
    dtype: str = "auto"


def load_items(request: EvalRequest, questions: dict | None = None) -> list[EvalItem]:
    """``questions``: how the model's training asked synthetic relative-depth questions (export's questions.json)."""
    items: list[EvalItem] = []
    if request.hardblink:
        items += list(hardblink_items(request.hardblink))
    if request.synthetic_scenes:
        items += list(synthetic_items(request.synthetic_scenes, questions))
    if request.refcoco:
        items += list(refcoco_items(request.refcoco, request.refcoco_dataset, request.refcoco_split_by,
                                    request.refcoco_splits, request.refcoco_images))
    if request.mmbench:
        items += list(mmbench_items(request.mmbench, circular=request.mmbench_circular))
    if request.limit:
        per_group: dict[str, int] = {}
        kept = []
        for item in items:  # a circular question counts once, with all its rotations
            if item.group != CIRCULAR_GROUP or item.key.endswith(f"{CIRCULAR_SEPARATOR}0"):
                per_group[item.group] = per_group.get(item.group, 0) + 1
            if per_group[item.group] <= request.limit:
                kept.append(item)
        items = kept
    return items


def eval_placement(device: str, dtype: str, local_rank: int, cuda_available: bool) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a rank evaluates (perceptio-eval's --device and --dtype): 'auto' is the rank's own
    GPU in bf16 when there is one, else the CPU in fp32."""
    on_gpu = device == "cuda" or (device == "auto" and cuda_available)
    where = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    precision = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype, torch.bfloat16 if on_gpu else torch.float32)
    return where, precision


def run_evaluation(request: EvalRequest) -> None:
    """Evaluate ``request.model`` on the benchmarks the request names."""
    import torch.distributed as dist

    from ..data.training_data import build_sample_builder
    from ..export import exported_chain, exported_config, exported_questions, load_exported
    from ..train.checkpoint import is_complete

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    folder = Path(request.model)
    if is_complete(folder):  # a training checkpoint: export it once (rank 0) into the report folder, then load that
        folder = Path(request.out) / "model"
        if rank == 0:
            from ..export import export_checkpoint

            export_checkpoint(request.model, folder)
        if distributed:
            dist.barrier()
    device, dtype = eval_placement(request.device, request.dtype,
                                   int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, tokenizer = load_exported(folder, dtype, device)  # built on the device, never in host memory first
    cfg = exported_config(folder)
    builder = build_sample_builder(cfg, tokenizer, model.token_ids)
    items = load_items(request, exported_questions(folder))
    batches = plan_batches(items, request.batch_size)
    settings = GenerationSettings(request.max_new_tokens, request.sample, request.temperature, request.top_p)
    chain = exported_chain(folder)
    mine = predict(model, tokenizer, builder, items, batches[rank::world], cfg.data.depth_tokens, request.depth_policy,
                   settings, progress=rank == 0, chain=chain)

    def gather(part: dict) -> dict:
        if not distributed:
            return dict(part)
        everything: list = [None] * world
        dist.all_gather_object(everything, list(part.items()))
        return {i: p for piece in everything for i, p in piece}

    own = gather(mine)  # every rank: "other image" codes may come from another rank's items
    interventions = {}
    if request.interventions:
        interventions = {name: gather(part) for name, part in intervene(model, tokenizer, builder, items,
                                                                        batches[rank::world], own, settings,
                                                                        progress=rank == 0).items()}
    if rank == 0:
        ordered = [own[i] for i in range(len(items))]
        grid = int(round(model.token_ids.num_depth_tokens ** 0.5))
        mean_path = folder / MEAN_DEPTH_FILE
        mean_depth = np.load(mean_path, allow_pickle=False) if mean_path.exists() else None
        figures, rows = score(items, ordered, interventions, (builder.geo.tile_size, grid), mean_depth)
        metrics = figures.to_json()
        out = Path(request.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        with open(out / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        report = write_report(out, items, ordered, rows, metrics)
        for name, group in figures.groups.items():
            print(f"{name:24s} {summary_line(group)}")
        for name, mean in figures.means.items():
            print(f"{name:24s} accuracy {100 * mean.accuracy:.1f}")
        print(f"report: {report}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
