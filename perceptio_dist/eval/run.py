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
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .benchmarks import (CIRCULAR_GROUP, CIRCULAR_SEPARATOR, EvalItem, hardblink_items, mmbench_items,
                         refcoco_items, synthetic_items)
from .baselines import baselines_table, legibility, relative_depth_baselines
from .depth_dependence import MEAN_DEPTH_FILE, depth_dependence
from .faithfulness import INTERVENTIONS, chain_consistent, chain_prefix, ground_truth_codes, intervention_codes
from .generate import GenerationSettings, Prediction, SpatialPolicy, generate
from .marker_step import group_marker_scores, marker_step_scores, marker_step_table
from .scoring import MaskScores, accuracy, parse_choice_letter

log = logging.getLogger("perceptio_dist.eval")
EXIT_USAGE = 2


# The training task whose answers an evaluation task's answers look like.
TRAINING_TASK = {"relative_depth": "relative_depth", "referring_seg": "referring_seg", "multiple_choice": "vqa"}


def _policy(task: str, chain: dict | None, depth_tokens: bool, depth_policy: str) -> SpatialPolicy:
    """Force the parts of the chain the task's training answers carried (chain.json of the export), forbid the
    others; ``depth_policy`` other than 'auto' overrides the depth block. Without a recorded chain: [SEG] for
    referring, the depth block for relative depth when the model was trained with depth tokens."""
    trained = (chain or {}).get(TRAINING_TASK[task])
    if trained is None:
        trained = {"seg": "force" if task == "referring_seg" else "forbid",
                   "depth": "force" if task == "relative_depth" and depth_tokens else "forbid"}
    return SpatialPolicy(seg=trained["seg"], depth=trained["depth"] if depth_policy == "auto" else depth_policy)


def plan_batches(items: list[EvalItem], batch_size: int) -> list[list[int]]:
    """Global batches of item indices, each of one task (one decoding policy). Ranks take whole batches,
    so a batch (and its padding) is the same whatever the rank count, and so are the results."""
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    return [idx[s:s + batch_size] for idx in by_task.values() for s in range(0, len(idx), batch_size)]


def predict(model, tokenizer, builder, items: list[EvalItem], batches: list[list[int]], depth_tokens: bool,
            depth_policy: str, settings: GenerationSettings, progress: bool,
            chain: dict | None = None) -> dict[int, Prediction]:
    from tqdm import tqdm

    out: dict[int, Prediction] = {}
    with tqdm(total=sum(map(len, batches)), desc="eval", unit="item", disable=not progress) as bar:
        for chunk in batches:
            prompts, pixels, sam, sizes = _generation_inputs(tokenizer, builder, items, chunk)
            policy = _policy(items[chunk[0]].task, chain, depth_tokens, depth_policy)
            for i, prediction in zip(chunk, generate(model, tokenizer, prompts, pixels, sam, sizes, policy, settings)):
                out[i] = prediction
            bar.update(len(chunk))
    return out


def _generation_inputs(tokenizer, builder, items: list[EvalItem], chunk: list[int]):
    """Prompts (up to the assistant header), tiles, SAM2 images and image sizes of a batch of items."""
    from ..data.conversation import encode_prompt
    from ..data.images import resize_normalised, to_tensor

    prompts, pixels, sam, sizes = [], [], [], []
    for i in chunk:
        item = items[i]
        tiles = builder.tiles(item.image)
        prompts.append(encode_prompt(tokenizer, builder.image_tokens, tiles.shape[0], item.question))
        pixels.append(tiles)
        sam.append(resize_normalised(to_tensor(item.image), builder.geo.sam_size))
        sizes.append(item.image.shape[:2])
    return prompts, pixels, sam, sizes


def intervene(model, tokenizer, builder, items: list[EvalItem], batches: list[list[int]],
              own: dict[int, Prediction], settings: GenerationSettings,
              progress: bool) -> dict[str, dict[int, Prediction]]:
    """Per intervention (eval/faithfulness.py), the answers generated after the same chain with other codes, for
    the relative-depth items of ``batches`` whose own answer has a depth block. Ranks take whole batches."""
    from tqdm import tqdm

    ids = model.token_ids
    own_codes = {i: p.depth_codes for i, p in own.items()
                 if items[i].task == "relative_depth" and p.depth_codes is not None}
    mine = [[i for i in chunk if i in own_codes] for chunk in batches]
    truth = {i: c for i in (j for chunk in mine for j in chunk) if (c := ground_truth_codes(model, items[i]))}
    text_only = SpatialPolicy(seg="forbid", depth="forbid")  # the chain is in the prompt now
    out: dict[str, dict[int, Prediction]] = {name: {} for name in INTERVENTIONS[1:]}
    with tqdm(total=sum(map(len, mine)) * len(out), desc="interventions", unit="answer",
              disable=not progress or not any(mine)) as bar:
        for chunk in mine:
            if not chunk:
                continue
            base = _generation_inputs(tokenizer, builder, items, chunk)  # once per batch, for every intervention
            for name in out:
                chosen, codes_of, prompts = [], [], []
                for k, i in enumerate(chunk):
                    codes = intervention_codes(name, i, items, own_codes, truth, ids.num_codes, ids.num_depth_tokens)
                    prefix = None if codes is None else chain_prefix(own[i], codes, ids)
                    if prefix is not None:
                        chosen.append(k)
                        codes_of.append(codes)
                        prompts.append(torch.cat([base[0][k], torch.tensor(prefix, dtype=torch.long)]))
                if chosen:
                    pixels, sam, sizes = ([part[k] for k in chosen] for part in base[1:])
                    answers = generate(model, tokenizer, prompts, pixels, sam, sizes, text_only, settings)
                    for k, codes, prediction in zip(chosen, codes_of, answers):
                        prediction.depth_codes = codes
                        out[name][chunk[k]] = prediction
                bar.update(len(chunk))
    return out


def score(items: list[EvalItem], predictions: list[Prediction],
          interventions: dict[str, dict[int, Prediction]] | None = None,
          geometry: tuple[int, int] | None = None, mean_depth: np.ndarray | None = None) -> tuple[dict, list[dict]]:
    """(metrics per group, one row per item). ``geometry`` (tile size, depth grid) adds the legibility numbers;
    ``mean_depth`` (the training set's mean map) the reference for the generated maps' error."""
    groups: dict[str, dict] = {}
    rows = []
    for index, (item, pred) in enumerate(zip(items, predictions)):
        row = {"group": item.group, "key": item.key, "question": item.question, "answer": item.answer,
               "prediction": pred.text, "depth_codes": pred.depth_codes, "has_mask": pred.mask is not None}
        g = groups.setdefault(item.group, {"correct": [], "masks": MaskScores()})
        if item.task == "referring_seg":
            row["iou"] = g["masks"].add(pred.mask, item.mask)
            # The reference restates the question's expression ("Sure, it is the green teddy."): repeating it
            # takes reading the question, the same in-context lookup a marker step needs in the image.
            row["answer_exact"] = pred.text.strip() == item.answer.strip()
            g.setdefault("exact", []).append(row["answer_exact"])
        else:
            letter = parse_choice_letter(pred.text, item.num_choices)
            expected = parse_choice_letter(item.answer, item.num_choices)
            row["parsed"], row["correct"] = letter, letter is not None and letter == expected
            g["correct"].append(row["correct"])
            g.setdefault("letters", []).append(letter or "none")
            if pred.depth is not None and item.gt_depth is not None:
                g.setdefault("maps", []).append((pred.depth, item.gt_depth))
            located = marker_step_scores(item.answer, pred.text)
            if located is not None:
                row["marker_step"] = located
                g.setdefault("marker_steps", []).append((item.answer, pred.text))
            consistent = chain_consistent(item, pred, letter)
            if consistent is not None:
                row["chain_consistent"] = consistent
                g.setdefault("consistent", []).append(consistent)
            if interventions and pred.depth_codes is not None:
                g.setdefault("intervened", {}).setdefault("own", []).append(row["correct"])
            for name, answers in (interventions or {}).items():
                if index in answers:
                    other = parse_choice_letter(answers[index].text, item.num_choices)
                    row.setdefault("interventions", {})[name] = {
                        "prediction": answers[index].text, "parsed": other, "correct": other == expected,
                        "codes": answers[index].depth_codes}
                    g["intervened"].setdefault(name, []).append(other == expected)
        rows.append(row)
    metrics: dict = {}
    for name, g in sorted(groups.items()):
        if g["masks"].per_sample:
            metrics[name] = {"ciou": g["masks"].ciou, "giou": g["masks"].giou, "count": len(g["masks"].per_sample)}
            if g.get("exact"):
                metrics[name]["answer_exact"] = accuracy(g["exact"])
        else:
            metrics[name] = {"accuracy": accuracy(g["correct"]), "count": len(g["correct"])}
            if g.get("letters"):  # a constant answer shows at once
                metrics[name]["answer_letters"] = dict(sorted(Counter(g["letters"]).items()))
        if g.get("marker_steps"):
            metrics[name].update(group_marker_scores(g["marker_steps"]))
        if "consistent" in g:
            metrics[name]["chain_consistency"] = accuracy(g["consistent"])
            metrics[name]["chain_count"] = len(g["consistent"])
        in_group = [item for item in items if item.group == name]
        if in_group[0].task == "relative_depth":
            metrics[name]["baselines"] = relative_depth_baselines(in_group)
            readable = legibility(in_group, *geometry) if geometry else None
            if readable:
                metrics[name]["legibility"] = readable
        if g.get("maps"):
            metrics[name]["depth_dependence"] = depth_dependence(g["maps"], mean_depth)
        if "intervened" in g:  # own: every answer with a depth block; the others on the items they apply to
            metrics[name]["interventions"] = {k: accuracy(v) for k, v in g["intervened"].items()}
            metrics[name]["intervention_counts"] = {k: len(v) for k, v in g["intervened"].items()}
    if CIRCULAR_GROUP in metrics:
        metrics[CIRCULAR_GROUP].update(circular_scores([r for r in rows if r["group"] == CIRCULAR_GROUP]))
    for prefix in ("hardblink", "synthetic_depth"):
        parts = [metrics[f"{prefix}_{n}"]["accuracy"] for n in (3, 4, 5) if f"{prefix}_{n}" in metrics]
        if parts:
            metrics[f"{prefix}_mean"] = {"accuracy": float(np.mean(parts)), "splits": len(parts)}
    return metrics, rows


def circular_scores(rows: list[dict]) -> dict:
    """VLMEvalKit's CircularEval over one question's rotations (keys <question>@<rotation>): right only if every
    rotation is right; the single pass is rotation 0 (the options in their original order)."""
    by_question: dict[str, list[bool]] = {}
    single = []
    for row in rows:
        question, rotation = row["key"].rsplit(CIRCULAR_SEPARATOR, 1)
        by_question.setdefault(question, []).append(row["correct"])
        if rotation == "0":
            single.append(row["correct"])
    return {"circular_accuracy": accuracy([all(v) for v in by_question.values()]),
            "single_pass_accuracy": accuracy(single), "questions": len(by_question)}


def faithfulness_table(metrics: dict) -> list[str]:
    """Markdown: per group, accuracy after each depth intervention and the chain consistency (eval/faithfulness.py)."""
    groups = [(name, m) for name, m in metrics.items() if "interventions" in m or "chain_consistency" in m]
    if not groups:
        return []
    lines = ["", "## Does the answer use the depth chain?", "",
             "Accuracy (%) when the answer follows the model's own depth codes, the ground truth's, random codes, a "
             "constant code or another image's codes; chain consistency: answers naming the point the model's own "
             "depth map puts nearest. Items per column in brackets.", "",
             "| group | " + " | ".join(INTERVENTIONS) + " | chain consistency |",
             "| --- |" + " ---: |" * (len(INTERVENTIONS) + 1)]
    for name, m in groups:
        acc, counts = m.get("interventions", {}), m.get("intervention_counts", {})
        cells = [f"{100 * acc[k]:.1f} ({counts[k]})" if k in acc else "–" for k in INTERVENTIONS]
        consistency = f"{100 * m['chain_consistency']:.1f} ({m['chain_count']})" if "chain_consistency" in m else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {consistency} |")
    return lines + depth_dependence_table(metrics)


def depth_dependence_table(metrics: dict) -> list[str]:
    """Markdown: per group, the generated depth maps' error beside the training-set mean map's (eval/depth_dependence.py)."""
    groups = [(name, m["depth_dependence"]) for name, m in metrics.items() if m.get("depth_dependence")]
    if not groups:
        return []
    lines = ["", "## Do the generated depth maps follow the image?", "",
             "AbsRel against the true depth after a per-image scale and shift, of the model's own decoded depth map "
             "and of the training set's mean map on the same items; a ratio under 1 means the maps depend on the "
             "image.", "", "| group | generated | training mean map | ratio | items |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, d in groups:
        mean = f"{d['mean_map_absrel']:.3f}" if "mean_map_absrel" in d else "–"
        ratio = f"{d['ratio']:.2f}" if "ratio" in d else "–"
        lines.append(f"| {name} | {d['generated_absrel']:.3f} | {mean} | {ratio} | {d['count']} |")
    return lines


def write_report(out: Path, items: list[EvalItem], predictions: list[Prediction], rows: list[dict], metrics: dict,
                 examples_per_group: int = 6) -> Path:
    """report.md: the metrics table and one picture per group (image, mask vs reference, depth, verdict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Evaluation report", "", "| group | metric | value | items |", "| --- | --- | ---: | ---: |"]
    for name, m in metrics.items():
        for key in ("accuracy", "single_pass_accuracy", "circular_accuracy", "ciou", "giou", "answer_exact"):
            if key in m:
                count = m.get("questions") if key == "circular_accuracy" else m.get("count", m.get("splits"))
                lines.append(f"| {name} | {key} | {100 * m[key]:.1f} | {count} |")
    lines += baselines_table(metrics)
    lines += faithfulness_table(metrics)
    lines += marker_step_table(metrics)
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
            # whole answers (a marker step is long), wrapped, left-aligned over the first two panels
            text = "\n".join([item.question[:90], *textwrap.wrap(f"ref: {item.answer}", 110),
                              *textwrap.wrap(f"got: {pred.text!r} | {verdict}", 110)])
            row_axes[0].set_title(text, fontsize=6, loc="left")
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


def load_items(args, questions: dict | None = None) -> list[EvalItem]:
    """``questions``: how the model's training asked synthetic relative-depth questions (export's questions.json)."""
    items: list[EvalItem] = []
    if args.hardblink:
        items += list(hardblink_items(args.hardblink))
    if args.synthetic_scenes:
        items += list(synthetic_items(args.synthetic_scenes, questions))
    if args.refcoco:
        items += list(refcoco_items(args.refcoco, args.refcoco_dataset, args.refcoco_split_by, args.refcoco_splits,
                                    args.refcoco_images))
    if args.mmbench:
        items += list(mmbench_items(args.mmbench, circular=getattr(args, "mmbench_circular", False)))
    if args.limit:
        per_group: dict[str, int] = {}
        kept = []
        for item in items:  # a circular question counts once, with all its rotations
            if item.group != CIRCULAR_GROUP or item.key.endswith(f"{CIRCULAR_SEPARATOR}0"):
                per_group[item.group] = per_group.get(item.group, 0) + 1
            if per_group[item.group] <= args.limit:
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


def run_evaluation(args) -> None:
    """Evaluate ``args.model`` on the benchmarks named in ``args`` (perceptio-eval's options, cli/eval.py)."""
    import torch.distributed as dist

    from ..data.training_data import build_sample_builder
    from ..export import exported_chain, exported_config, exported_questions, load_exported
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
    device, dtype = eval_placement(getattr(args, "device", "auto"), getattr(args, "dtype", "auto"),
                                   int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, tokenizer = load_exported(folder, dtype, device)  # built on the device, never in host memory first
    cfg = exported_config(folder)
    builder = build_sample_builder(cfg, tokenizer, model.token_ids)
    items = load_items(args, exported_questions(folder))
    batches = plan_batches(items, args.batch_size)
    settings = GenerationSettings(args.max_new_tokens, args.sample, args.temperature, args.top_p)
    chain = exported_chain(folder)
    mine = predict(model, tokenizer, builder, items, batches[rank::world], cfg.data.depth_tokens, args.depth_policy,
                   settings, progress=rank == 0, chain=chain)

    def gather(part: dict) -> dict:
        if not distributed:
            return dict(part)
        everything: list = [None] * world
        dist.all_gather_object(everything, list(part.items()))
        return {i: p for piece in everything for i, p in piece}

    own = gather(mine)  # every rank: "other image" codes may come from another rank's items
    interventions = {}
    if args.interventions:
        interventions = {name: gather(part) for name, part in intervene(model, tokenizer, builder, items,
                                                                        batches[rank::world], own, settings,
                                                                        progress=rank == 0).items()}
    if rank == 0:
        ordered = [own[i] for i in range(len(items))]
        grid = int(round(model.token_ids.num_depth_tokens ** 0.5))
        mean_path = folder / MEAN_DEPTH_FILE
        mean_depth = np.load(mean_path, allow_pickle=False) if mean_path.exists() else None
        metrics, rows = score(items, ordered, interventions, (builder.geo.tile_size, grid), mean_depth)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        with open(out / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        report = write_report(out, items, ordered, rows, metrics)
        for name, m in metrics.items():
            values = ", ".join(f"{k} {100 * v:.1f}" for k, v in m.items()
                               if k in ("accuracy", "ciou", "giou", "chain_consistency"))
            after = ", ".join(f"{k} {100 * v:.1f}" for k, v in m.get("interventions", {}).items())
            print(f"{name:24s} {values}" + (f" | after codes: {after}" if after else ""))
        print(f"report: {report}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
