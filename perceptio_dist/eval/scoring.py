"""Scores of the evaluation benchmarks: choice letters from free text, referring-segmentation IoUs,
multiple-choice accuracy."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import numpy as np

# Most explicit first: "(B)"; then "point/option/answer/choice (is) B" (a lowercase letter there only when nothing
# follows it: "answer: b", not "the answer is a point"); the whole answer a letter; a lone capital last, but not
# "A" or "I" followed by a word other than is/was/seems/looks/appears (an article or a pronoun: "A point on the
# left", "I think"; "A is closest" is a choice).
_PARENTHESISED = re.compile(r"\(\s*([A-Za-z])\s*\)")
_NAMED = re.compile(r"(?i:\b(?:point|option|answer|choice)\s*(?:is\s*)?:?\s*)"
                    r"(?:([A-Z])(?![A-Za-z])|([a-z])(?=\s*(?:$|[.,;!?])))")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])(?!(?<=[AI])\s+(?!(?:is|was|seems|looks|appears)\b)[a-z])")


def parse_choice_letter(text: str, num_choices: int) -> str | None:
    """The letter a free-text answer picks among A.. (num_choices letters), or None when no letter is meant.

    "(B)", "B", "b.", "Point B is closest", "The answer is C", "answer: c" parse; "The answer is a point ..." and
    "A point is closest" do not (an article, not a choice)."""
    valid = set(string.ascii_uppercase[:num_choices])
    for match in _PARENTHESISED.finditer(text):
        if match.group(1).upper() in valid:
            return match.group(1).upper()
    for match in _NAMED.finditer(text):
        letter = (match.group(1) or match.group(2)).upper()
        if letter in valid:
            return letter
    stripped = text.strip().rstrip(".):").lstrip("(").strip()
    if len(stripped) == 1 and stripped.upper() in valid:
        return stripped.upper()
    for match in _LONE_CAPITAL.finditer(text):
        if match.group(1) in valid:
            return match.group(1)
    return None


@dataclass
class MaskScores:
    """cIoU = total intersection / total union over a split; gIoU = mean of per-sample IoUs."""

    intersection: int = 0
    union: int = 0
    per_sample: list[float] = field(default_factory=list)

    def add(self, predicted: np.ndarray | None, target: np.ndarray) -> float:
        target = target.astype(bool)
        predicted = np.zeros_like(target) if predicted is None else predicted.astype(bool)
        if predicted.shape != target.shape:
            raise ValueError(f"predicted mask {predicted.shape} does not match the target {target.shape}")
        inter = int(np.logical_and(predicted, target).sum())
        union = int(np.logical_or(predicted, target).sum())
        iou = inter / union if union else 1.0  # both empty: a perfect answer
        self.intersection += inter
        self.union += union
        self.per_sample.append(iou)
        return iou

    @property
    def ciou(self) -> float:
        return self.intersection / self.union if self.union else float("nan")

    @property
    def giou(self) -> float:
        return float(np.mean(self.per_sample)) if self.per_sample else float("nan")


def accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct) if correct else float("nan")
