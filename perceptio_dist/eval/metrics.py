"""The metrics of an evaluation: one row per item and the figures per group (accuracy or cIoU/gIoU and counts,
the baselines, legibility, chain consistency, the interventions, the depth maps' dependence on the image,
CircularEval, the means over HardBLINK's and the synthetic scenes' point counts)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .baselines import legibility, relative_depth_baselines
from .benchmarks import CIRCULAR_GROUP, CIRCULAR_SEPARATOR, EvalItem
from .depth_dependence import depth_dependence
from .faithfulness import chain_consistent
from .generate import Prediction
from .marker_step import group_marker_scores, marker_step_scores
from .scoring import MaskScores, accuracy, parse_choice_letter


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
