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
from pathlib import Path

import numpy as np

from .benchmarks import EvalItem, hardblink_items, mmbench_items, refcoco_items, synthetic_items
from .generate import GenerationSettings, Prediction, SpatialPolicy, generate
from .scoring import MaskScores, accuracy, parse_choice_letter

log = logging.getLogger("perceptio_dist.eval")
EXIT_USAGE = 2


def _policy(task: str, depth_tokens: bool, depth_policy: str) -> SpatialPolicy:
    depth = depth_policy if depth_policy != "auto" else ("force" if depth_tokens else "forbid")
    if task == "referring_seg":
        return SpatialPolicy(seg="force", depth=depth)
    if task == "multiple_choice":
        return SpatialPolicy(seg="forbid", depth="forbid" if depth_policy == "auto" else depth)
    return SpatialPolicy(seg="forbid", depth=depth)


def plan_batches(items: list[EvalItem], batch_size: int) -> list[list[int]]:
    """Global batches of item indices, each of one task (one decoding policy). Ranks take whole batches,
    so a batch (and its padding) is the same whatever the rank count, and so are the results."""
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    return [idx[s:s + batch_size] for idx in by_task.values() for s in range(0, len(idx), batch_size)]


def predict(model, tokenizer, builder, items: list[EvalItem], batches: list[list[int]], depth_tokens: bool,
            depth_policy: str, settings: GenerationSettings, progress: bool) -> dict[int, Prediction]:
    from tqdm import tqdm

    from ..data.conversation import encode_prompt
    from ..data.images import resize_normalised, to_tensor

    out: dict[int, Prediction] = {}
    with tqdm(total=sum(map(len, batches)), desc="eval", unit="item", disable=not progress) as bar:
        for chunk in batches:
            prompts, pixels, sam, sizes = [], [], [], []
            for i in chunk:
                item = items[i]
                tiles = builder.tiles(item.image)
                prompts.append(encode_prompt(tokenizer, builder.image_tokens, tiles.shape[0], item.question))
                pixels.append(tiles)
                sam.append(resize_normalised(to_tensor(item.image), builder.geo.sam_size))
                sizes.append(item.image.shape[:2])
            policy = _policy(items[chunk[0]].task, depth_tokens, depth_policy)
            for i, prediction in zip(chunk, generate(model, tokenizer, prompts, pixels, sam, sizes, policy, settings)):
                out[i] = prediction
            bar.update(len(chunk))
    return out


def score(items: list[EvalItem], predictions: list[Prediction]) -> tuple[dict, list[dict]]:
    groups: dict[str, dict] = {}
    rows = []
    for item, pred in zip(items, predictions):
        row = {"group": item.group, "key": item.key, "question": item.question, "answer": item.answer,
               "prediction": pred.text, "depth_codes": pred.depth_codes, "has_mask": pred.mask is not None}
        g = groups.setdefault(item.group, {"correct": [], "masks": MaskScores()})
        if item.task == "referring_seg":
            row["iou"] = g["masks"].add(pred.mask, item.mask)
        else:
            letter = parse_choice_letter(pred.text, item.num_choices)
            expected = parse_choice_letter(item.answer, item.num_choices)
            row["parsed"], row["correct"] = letter, letter is not None and letter == expected
            g["correct"].append(row["correct"])
        rows.append(row)
    metrics: dict = {}
    for name, g in sorted(groups.items()):
        if g["masks"].per_sample:
            metrics[name] = {"ciou": g["masks"].ciou, "giou": g["masks"].giou, "count": len(g["masks"].per_sample)}
        else:
            metrics[name] = {"accuracy": accuracy(g["correct"]), "count": len(g["correct"])}
    for prefix in ("hardblink", "synthetic_depth"):
        parts = [metrics[f"{prefix}_{n}"]["accuracy"] for n in (3, 4, 5) if f"{prefix}_{n}" in metrics]
        if parts:
            metrics[f"{prefix}_mean"] = {"accuracy": float(np.mean(parts)), "splits": len(parts)}
    return metrics, rows


def write_report(out: Path, items: list[EvalItem], predictions: list[Prediction], rows: list[dict], metrics: dict,
                 examples_per_group: int = 6) -> Path:
    """report.md: the metrics table and one picture per group (image, mask vs reference, depth, verdict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Evaluation report", "", "| group | metric | value | items |", "| --- | --- | ---: | ---: |"]
    for name, m in metrics.items():
        for key in ("accuracy", "ciou", "giou"):
            if key in m:
                lines.append(f"| {name} | {key} | {100 * m[key]:.1f} | {m.get('count', m.get('splits'))} |")
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group, []).append(i)
    for name, indices in groups.items():
        chosen = indices[:examples_per_group]
        fig, axes = plt.subplots(len(chosen), 3, figsize=(10, 3.2 * len(chosen)), squeeze=False)
        for row_axes, i in zip(axes, chosen):
            item, pred, row = items[i], predictions[i], rows[i]
            row_axes[0].imshow(item.image)
            verdict = (f"IoU {row['iou']:.2f}" if "iou" in row else ("right" if row["correct"] else "wrong"))
            row_axes[0].set_title(f"{item.question[:60]}\nref {item.answer[:30]} | got {pred.text[:30]!r} | {verdict}",
                                  fontsize=7)
            overlay = item.image.astype(float) / 255
            if item.mask is not None or pred.mask is not None:
                tint = overlay.copy()
                if item.mask is not None:
                    tint[item.mask] = 0.5 * tint[item.mask] + 0.5 * np.array([0.0, 1.0, 0.0])
                if pred.mask is not None:
                    tint[pred.mask] = 0.5 * tint[pred.mask] + 0.5 * np.array([1.0, 0.0, 0.0])
                overlay = tint
            row_axes[1].imshow(overlay)
            row_axes[1].set_title("mask: predicted red, reference green" if item.task == "referring_seg" else "",
                                  fontsize=7)
            if pred.depth is not None:
                row_axes[2].imshow(pred.depth, cmap="magma")
                row_axes[2].set_title("generated depth tokens, decoded (bright = near)", fontsize=7)
            else:
                row_axes[2].text(0.5, 0.5, "no depth block", ha="center", va="center")
            for ax in row_axes:
                ax.axis("off")
        fig.tight_layout()
        picture = out / f"examples_{name}.png"
        fig.savefig(picture, dpi=80)
        plt.close(fig)
        lines += ["", f"## {name}", "", f"![{name}]({picture.name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def load_items(args) -> list[EvalItem]:
    items: list[EvalItem] = []
    if args.hardblink:
        items += list(hardblink_items(args.hardblink))
    if args.synthetic_scenes:
        items += list(synthetic_items(args.synthetic_scenes))
    if args.refcoco:
        items += list(refcoco_items(args.refcoco, args.refcoco_dataset, args.refcoco_split_by, args.refcoco_splits,
                                    args.refcoco_images))
    if args.mmbench:
        items += list(mmbench_items(args.mmbench))
    if args.limit:
        per_group: dict[str, int] = {}
        kept = []
        for item in items:
            per_group[item.group] = per_group.get(item.group, 0) + 1
            if per_group[item.group] <= args.limit:
                kept.append(item)
        items = kept
    return items


def run_evaluation(args) -> None:
    """Evaluate ``args.model`` on the benchmarks named in ``args`` (perceptio-eval's options, cli/eval.py)."""
    import torch.distributed as dist

    from ..data.training_data import build_sample_builder
    from ..export import exported_config, load_exported
    from ..train.checkpoint import is_complete

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    folder = Path(args.model)
    if is_complete(folder):  # a training checkpoint: export it once (rank 0) into the report folder, then load that
        folder = Path(args.out) / "model"
        if rank == 0:
            from ..export import export_checkpoint

            export_checkpoint(args.model, folder)
        if distributed:
            dist.barrier()
    model, tokenizer = load_exported(folder)
    cfg = exported_config(folder)
    builder = build_sample_builder(cfg, tokenizer, model.token_ids)
    items = load_items(args)
    batches = plan_batches(items, args.batch_size)
    settings = GenerationSettings(args.max_new_tokens, args.sample, args.temperature, args.top_p)
    mine = predict(model, tokenizer, builder, items, batches[rank::world], cfg.data.depth_tokens, args.depth_policy,
                   settings, progress=rank == 0)
    gathered = list(mine.items())
    if distributed:
        everything: list = [None] * world
        dist.all_gather_object(everything, gathered)
        gathered = [pair for part in everything for pair in part]
    if rank == 0:
        ordered = [p for _, p in sorted(gathered, key=lambda pair: pair[0])]
        metrics, rows = score(items, ordered)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        with open(out / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        report = write_report(out, items, ordered, rows, metrics)
        for name, m in metrics.items():
            values = ", ".join(f"{k} {100 * v:.1f}" for k, v in m.items() if k in ("accuracy", "ciou", "giou"))
            print(f"{name:24s} {values}")
        print(f"report: {report}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
