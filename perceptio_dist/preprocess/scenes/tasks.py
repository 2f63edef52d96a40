"""Training samples from a rendered scene, for every task, with answers that are exact by construction.

* referring_seg: "the red sphere", or "the red sphere left of the duck" when colour and kind are
  not enough; an expression is used only if exactly one visible object satisfies it. The answer
  carries both spatial parts ([SEG], then the depth block): the scene's depth is exact.
* relative_depth: HardBLINK-style. 3, 4 or 5 points at mid-image height, at least
  ``min_separation`` of the width apart, on visible surfaces, the closest at least ``min_gap``
  nearer than the next; drawn as labelled markers at preprocessing time. Answer "(B)". With
  ``QuestionRules.grid`` every marker has its own cell of that grid (the depth grid), and the
  ordering also holds for the cells' mean depth, so the depth tokens can answer the question.
  ``QuestionRules.per_scene`` marker sets (questions) are drawn per scene. The answer's form is a registered
  answer format (registry.ANSWER_FORMATS): "letter" here; with ``QuestionRules.marker_step`` the toy world's
  marker step (experiments/toy/marker_step.py), which first reads every marker out of the depth map:
  "A at 3,5 near 7; B at 3,1 near 3; C at 4,6 near 5. (A)".
* depth: depth-only generation.
* vqa: object count, or the colour of the only object of a kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ...registry import ANSWER_FORMATS
from ..records import CLOSEST_POINT_QUESTION, DEPTH_ANSWER, DEPTH_QUESTION, Record, safe_key

LETTERS = "ABCDE"
RELATIONS = {
    "left of": lambda a, b: a["centroid"][0] < b["centroid"][0] - 10,
    "right of": lambda a, b: a["centroid"][0] > b["centroid"][0] + 10,
    "in front of": lambda a, b: a["depth"] < 0.9 * b["depth"],
    "behind": lambda a, b: a["depth"] > 1.1 * b["depth"],
}


@dataclass(frozen=True)
class PointRules:
    min_separation: float = 0.12  # fraction of the image width between any two points
    min_gap: float = 0.10  # the closest point is at least this much (relative) nearer than the next
    band: tuple[float, float] = (0.42, 0.58)  # rows (fractions of the height) where points are placed
    margin: float = 0.06  # fraction of the width kept free at the left and right edges
    grid: Optional[int] = None  # every marker in its own cell of this grid, ordering true for cell means too


@dataclass(frozen=True)
class QuestionRules:
    """How the relative-depth questions of a scene are made (preprocess SourceConfig fields of the same names)."""

    per_scene: int = 1  # marker sets, i.e. questions, per scene
    counts: tuple[int, ...] = (3, 4, 5)  # number of points, drawn uniformly
    marker_style: str = "hardblink"  # records.MARKER_STYLES
    points: PointRules = PointRules()
    marker_step: bool = False  # answers read the markers out of the depth grid first (needs points.grid)
    step_format: str = "cells"  # the marker step's form (experiments/toy/marker_step.py)

    @property
    def answer_format(self) -> str:
        """The registered answer format (registry.ANSWER_FORMATS) that writes these questions' answers."""
        return "marker_step" if self.marker_step else "letter"


class LetterAnswer:
    """The answer format of HardBLINK: the closest point's letter, "(B)"."""

    attempts = 1  # marker sets drawn until one the format can answer

    def write(self, depth: np.ndarray, points: list[list[float]], closest: int, rules: QuestionRules) -> Optional[str]:
        return f"({LETTERS[closest]})"


ANSWER_FORMATS.register("letter", LetterAnswer())


def describe(obj: dict) -> str:
    return f"{obj['colour']} {obj['kind']}"


def referring_expression(target: dict, visible: list[dict], rng: np.random.Generator) -> Optional[str]:
    """An expression that only ``target`` among ``visible`` satisfies, or None."""
    same = [o for o in visible if describe(o) == describe(target)]
    others = [o for o in visible if describe(o) != describe(target)]
    if len(same) == 1 and (not others or rng.random() < 0.6):
        return f"the {describe(target)}"
    options = [(name, o) for o in others for name, holds in RELATIONS.items()
               if holds(target, o) and not any(holds(s, o) for s in same if s is not target)]
    if not options:
        return f"the {describe(target)}" if len(same) == 1 else None
    name, anchor = options[int(rng.integers(len(options)))]
    return f"the {describe(target)} {name} the {describe(anchor)}"


def closest_point_markers(depth: np.ndarray, count: int, rng: np.random.Generator, rules: PointRules = PointRules(),
                          tries: int = 300) -> Optional[tuple[list[list[float]], int]]:
    """Marker positions and the index of the closest one, or None if the rules cannot be met."""
    h, w = depth.shape
    means = cell_means(depth, rules.grid) if rules.grid is not None else None
    for _ in range(tries):
        xs = rng.uniform(rules.margin * w, (1 - rules.margin) * w, count)
        if count > 1 and np.min(np.diff(np.sort(xs))) < rules.min_separation * w:
            continue
        ys = rng.uniform(rules.band[0] * h, rules.band[1] * h, count)
        values = depth[ys.astype(int), xs.astype(int)]
        order = np.argsort(values)
        if values[order[1]] < (1 + rules.min_gap) * values[order[0]]:
            continue
        if rules.grid is not None:
            cells = [(int(y * rules.grid / h), int(x * rules.grid / w)) for x, y in zip(xs, ys)]
            if len(set(cells)) < count:
                continue
            cell_values = np.array([means[c] for c in cells])
            cell_order = np.argsort(cell_values)
            if cell_order[0] != order[0] or cell_values[cell_order[1]] < (1 + rules.min_gap) * cell_values[cell_order[0]]:
                continue
        return [[float(x), float(y)] for x, y in zip(xs, ys)], int(order[0])
    return None


def cell_means(depth: np.ndarray, grid: int) -> np.ndarray:
    """grid x grid mean depth over the cells that split the image evenly (the depth tokens' view of it)."""
    h, w = depth.shape
    rows = np.minimum((np.arange(h) * grid) // h, grid - 1)
    cols = np.minimum((np.arange(w) * grid) // w, grid - 1)
    sums = np.zeros((grid, grid))
    np.add.at(sums, (rows[:, None], cols[None, :]), depth)
    counts = np.zeros((grid, grid))
    np.add.at(counts, (rows[:, None], cols[None, :]), 1)
    return sums / counts


def scene_records(folder: Path, meta: dict, depth: np.ndarray, tasks: list[str],
                  questions: QuestionRules = QuestionRules()) -> list[Record]:
    """All records of one scene folder (rgb.png, depth.npy, instances.png, meta.json)."""
    seed = meta["seed"]
    rng = np.random.default_rng([seed, 11])
    objects = meta["objects"]
    limit = 0.002 * depth.size
    visible = [o for o in objects if o["visible_pixels"] >= limit]
    image, depth_path, instances = str(folder / "rgb.png"), str(folder / "depth.npy"), str(folder / "instances.png")
    base = dict(source="synthetic", image=image, depth=depth_path, meta={"scene": folder.name, "seed": seed})
    records: list[Record] = []
    if "referring_seg" in tasks:
        for target in [visible[i] for i in rng.permutation(len(visible))][:2]:
            expression = referring_expression(target, visible, rng)
            if expression is None:
                continue
            records.append(Record(
                key=safe_key("synthetic", seed, "seg", target["index"]), task="referring_seg",
                turns=[[f"Please segment {expression} in this image.", f"Sure, it is {expression}."]],
                with_seg=True, with_depth=True, mask={"png": instances, "value": target["index"] + 1},
                **{**base, "meta": {**base["meta"], "expression": expression}},
            ))
    if "relative_depth" in tasks:
        # The first set draws from the scene's own generator as it always did, so one set per scene (the
        # default) keeps every earlier scene's question; further sets draw from their own generators.
        for index in range(questions.per_scene):
            draw = rng if index == 0 else np.random.default_rng([seed, 13, index])
            count = int(questions.counts[int(draw.integers(len(questions.counts)))])
            answer, answer_format = None, ANSWER_FORMATS[questions.answer_format]
            for _ in range(answer_format.attempts):
                found = closest_point_markers(depth, count, draw, questions.points)
                if found is None:
                    break
                points, closest = found
                answer = answer_format.write(depth, points, closest, questions)
                if answer is not None:
                    break
            if answer is None:
                continue
            key = safe_key("synthetic", seed, "reldepth", count) if index == 0 else \
                safe_key("synthetic", seed, "reldepth", count, index)
            records.append(Record(
                key=key, task="relative_depth", turns=[[CLOSEST_POINT_QUESTION, answer]],
                with_depth=True, points=points, marker_style=questions.marker_style,
                **{**base, "meta": {**base["meta"], "num_points": count}},
            ))
    if "depth" in tasks:
        records.append(Record(key=safe_key("synthetic", seed, "depth"), task="depth",
                              turns=[[DEPTH_QUESTION, DEPTH_ANSWER]], with_depth=True, **base))
    if "vqa" in tasks:
        kinds = [o["kind"] for o in visible]
        unique = [o for o in visible if kinds.count(o["kind"]) == 1]
        if len(visible) == len(objects) and (not unique or rng.random() < 0.5):
            turn = ["How many objects are on the table?", f"There are {len(objects)} objects."]
        elif unique:
            obj = unique[int(rng.integers(len(unique)))]
            turn = [f"What colour is the {obj['kind']}?", f"It is {obj['colour']}."]
        else:
            turn = None
        if turn:
            records.append(Record(key=safe_key("synthetic", seed, "vqa"), task="vqa", turns=[turn], **base))
    return records
