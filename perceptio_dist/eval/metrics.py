"""The metrics of an evaluation: one row per item and the figures per group (accuracy or cIoU/gIoU and counts,
the baselines, legibility, chain consistency, the interventions, the depth maps' dependence on the image,
CircularEval, the means over HardBLINK's and the synthetic scenes' point counts).

The figures are typed (:class:`EvalMetrics`, one :class:`GroupMetrics` per group, a part for each kind of figure,
None where a group has none). Diagnostics registered by experiments (registry.EVAL_DIAGNOSTICS: ``score_row``
per item, None where the item has nothing to measure; ``summarise`` per group; ``table`` for the report) run on
the items whose references have what they measure; ``to_json`` writes metrics.json in its documented layout, the form the report, the
demo and the sweep read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..registry import EVAL_DIAGNOSTICS
from .baselines import legibility, relative_depth_baselines
from .benchmarks import CIRCULAR_GROUP, CIRCULAR_SEPARATOR, EvalItem
from .depth_dependence import depth_dependence
from .faithfulness import chain_consistent
from .generate import Prediction
from .intervals import PairedDifference, paired_difference, wilson
from .scoring import MaskScores, accuracy, parse_choice_letter

SPLIT_MEANS = ("hardblink", "synthetic_depth")  # groups <prefix>_3/4/5 averaged into <prefix>_mean


@dataclass
class MaskFigures:
    """Referring segmentation: cumulative and mean IoU over the group's masks, and exact restatements (with their
    95 % Wilson interval)."""
    ciou: float
    giou: float
    count: int
    answer_exact: Optional[float] = None
    answer_exact_interval: Optional[tuple[float, float]] = None


@dataclass
class ChoiceFigures:
    """A multiple-choice group: accuracy and its 95 % Wilson interval, items, and how often each letter was answered
    ('none': unparsed)."""
    accuracy: float
    count: int
    interval: tuple[float, float]
    answer_letters: Optional[dict[str, int]] = None


@dataclass
class ChainFigures:
    """Answers naming the point the model's own depth map puts nearest, with the 95 % Wilson interval."""
    consistency: float
    count: int
    interval: tuple[float, float]


@dataclass
class InterventionFigures:
    """Accuracy with the model's own depth codes and after each replacement, the items each applies to, and each
    replacement against the own codes on the same items (eval/intervals.py)."""
    accuracy: dict[str, float]
    counts: dict[str, int]
    against_own: dict[str, PairedDifference] = field(default_factory=dict)


@dataclass
class CircularFigures:
    """VLMEvalKit's CircularEval over one question's option rotations."""
    circular_accuracy: float
    single_pass_accuracy: float
    questions: int


@dataclass
class GroupMetrics:
    """Everything measured on one benchmark group; exactly one of ``masks`` and ``choices`` is set."""
    masks: Optional[MaskFigures] = None
    choices: Optional[ChoiceFigures] = None
    diagnostics: dict[str, dict] = field(default_factory=dict)  # by registered diagnostic, where the data has it
    chain: Optional[ChainFigures] = None
    baselines: Optional[dict[str, float]] = None
    legibility: Optional[dict[str, float]] = None
    depth_dependence: Optional[dict] = None
    interventions: Optional[InterventionFigures] = None
    circular: Optional[CircularFigures] = None

    @property
    def accuracy(self) -> Optional[float]:
        return self.choices.accuracy if self.choices else None

    def to_json(self) -> dict:
        out: dict = {}
        if self.masks:
            out.update(ciou=self.masks.ciou, giou=self.masks.giou, count=self.masks.count)
            if self.masks.answer_exact is not None:
                out["answer_exact"] = self.masks.answer_exact
                out["answer_exact_ci"] = list(self.masks.answer_exact_interval)
        if self.choices:
            out.update(accuracy=self.choices.accuracy, count=self.choices.count,
                       accuracy_ci=list(self.choices.interval))
            if self.choices.answer_letters is not None:
                out["answer_letters"] = self.choices.answer_letters
        for figures in self.diagnostics.values():
            out.update(figures)
        if self.chain:
            out.update(chain_consistency=self.chain.consistency, chain_count=self.chain.count,
                       chain_consistency_ci=list(self.chain.interval))
        for name in ("baselines", "legibility", "depth_dependence"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.interventions:
            out.update(interventions=self.interventions.accuracy, intervention_counts=self.interventions.counts,
                       intervention_against_own={k: d.to_json() for k, d in self.interventions.against_own.items()})
        if self.circular:
            out.update(vars(self.circular))
        return out


@dataclass
class SplitMean:
    """The mean accuracy over a benchmark's 3-, 4- and 5-point groups, and how many of them were evaluated."""
    accuracy: float
    splits: int


@dataclass
class EvalMetrics:
    groups: dict[str, GroupMetrics] = field(default_factory=dict)
    means: dict[str, SplitMean] = field(default_factory=dict)  # by name, e.g. hardblink_mean

    def to_json(self) -> dict:
        """metrics.json: the groups by name, then the means."""
        out = {name: group.to_json() for name, group in sorted(self.groups.items())}
        out.update({name: vars(mean).copy() for name, mean in self.means.items()})
        return out


def score(items: list[EvalItem], predictions: list[Prediction],
          interventions: dict[str, dict[int, Prediction]] | None = None,
          geometry: tuple[int, int] | None = None, mean_depth: np.ndarray | None = None
          ) -> tuple[EvalMetrics, list[dict]]:
    """(the figures, one row per item). ``geometry`` (tile size, depth grid) adds the legibility numbers;
    ``mean_depth`` (the training set's mean map) the reference for the generated maps' error."""
    groups: dict[str, dict] = {}
    rows = []
    diagnostics = dict(EVAL_DIAGNOSTICS.items())
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
            for name, diagnostic in diagnostics.items():  # only where the reference has what it measures
                measured = diagnostic.score_row(item.answer, pred.text)
                if measured is not None:
                    row[diagnostic.row_key] = measured
                    g.setdefault("diagnosed", {}).setdefault(name, []).append((item.answer, pred.text))
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
                    if pred.depth_codes is not None:  # the same item with the model's own codes
                        g.setdefault("paired", {}).setdefault(name, []).append((row["correct"], other == expected))
        rows.append(row)
    metrics = EvalMetrics()
    for name, g in sorted(groups.items()):
        group = metrics.groups[name] = GroupMetrics()
        if g["masks"].per_sample:
            exact = g.get("exact")
            group.masks = MaskFigures(g["masks"].ciou, g["masks"].giou, len(g["masks"].per_sample),
                                      accuracy(exact) if exact else None,
                                      wilson(sum(exact), len(exact)) if exact else None)
        else:  # a constant answer shows at once in the letters
            letters = dict(sorted(Counter(g["letters"]).items())) if g.get("letters") else None
            group.choices = ChoiceFigures(accuracy(g["correct"]), len(g["correct"]),
                                          wilson(sum(g["correct"]), len(g["correct"])), letters)
        for diagnostic, pairs in g.get("diagnosed", {}).items():
            group.diagnostics[diagnostic] = diagnostics[diagnostic].summarise(pairs)
        if "consistent" in g:
            group.chain = ChainFigures(accuracy(g["consistent"]), len(g["consistent"]),
                                       wilson(sum(g["consistent"]), len(g["consistent"])))
        in_group = [item for item in items if item.group == name]
        if in_group[0].task == "relative_depth":
            group.baselines = relative_depth_baselines(in_group)
            group.legibility = (legibility(in_group, *geometry) if geometry else None) or None
        if g.get("maps"):
            group.depth_dependence = depth_dependence(g["maps"], mean_depth)
        if "intervened" in g:  # own: every answer with a depth block; the others on the items they apply to
            group.interventions = InterventionFigures(
                {k: accuracy(v) for k, v in g["intervened"].items()}, {k: len(v) for k, v in g["intervened"].items()},
                {k: paired_difference([other for _, other in pairs], [own for own, _ in pairs])  # other - own
                 for k, pairs in g.get("paired", {}).items()})
    if CIRCULAR_GROUP in metrics.groups:
        metrics.groups[CIRCULAR_GROUP].circular = circular_scores([r for r in rows if r["group"] == CIRCULAR_GROUP])
    for prefix in SPLIT_MEANS:
        parts = [metrics.groups[f"{prefix}_{n}"].accuracy for n in (3, 4, 5) if f"{prefix}_{n}" in metrics.groups]
        if parts:
            metrics.means[f"{prefix}_mean"] = SplitMean(float(np.mean(parts)), len(parts))
    return metrics, rows


def circular_scores(rows: list[dict]) -> CircularFigures:
    """VLMEvalKit's CircularEval over one question's rotations (keys <question>@<rotation>): right only if every
    rotation is right; the single pass is rotation 0 (the options in their original order)."""
    by_question: dict[str, list[bool]] = {}
    single = []
    for row in rows:
        question, rotation = row["key"].rsplit(CIRCULAR_SEPARATOR, 1)
        by_question.setdefault(question, []).append(row["correct"])
        if rotation == "0":
            single.append(row["correct"])
    return CircularFigures(accuracy([all(v) for v in by_question.values()]), accuracy(single), len(by_question))


def summary_line(group: GroupMetrics) -> str:
    """One console line of a group's headline figures, in percent."""
    values, interval = {}, ""
    if group.choices:
        values["accuracy"] = group.choices.accuracy
        interval = " [{:.1f}, {:.1f}]".format(*(100 * x for x in group.choices.interval))
    if group.masks:
        values.update(ciou=group.masks.ciou, giou=group.masks.giou)
    if group.chain:
        values["chain_consistency"] = group.chain.consistency
    line = ", ".join(f"{k} {100 * v:.1f}" + (interval if k == "accuracy" else "") for k, v in values.items())
    if group.interventions:
        line += " | after codes: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in group.interventions.accuracy.items())
    return line
