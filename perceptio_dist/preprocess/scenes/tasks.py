"""Training samples from a rendered scene, for every task, with answers that are exact by construction.

* referring_seg: "the red sphere", or "the red sphere left of the duck" when colour and kind are
  not enough; an expression is used only if exactly one visible object satisfies it. The answer
  carries both spatial parts ([SEG], then the depth block): the scene's depth is exact.
* relative_depth: HardBLINK-style. 3, 4 or 5 points at mid-image height, at least
  ``min_separation`` of the width apart, on visible surfaces, the closest at least ``min_gap``
  nearer than the next; drawn as labelled markers at preprocessing time. Answer "(B)". With
  ``QuestionRules.grid`` every marker has its own cell of that grid (the depth grid), and the
  ordering also holds for the cells' mean depth, so the depth tokens can answer the question.
  ``QuestionRules.per_scene`` marker sets (questions) are drawn per scene. With
  ``QuestionRules.marker_step`` the answer first reads every marker out of the depth map, then answers:
  "A at 3,5 near 7; B at 3,1 near 3; C at 4,6 near 5. (A)" (cell row,column of the depth grid, nearness
  0-9 = the cell's mean normalised inverse depth in tenths); only sets whose closest marker has the strictly
  highest nearness are kept. A documented option after AURORA's best chain (marker coordinates, then depth).
  ``QuestionRules.step_format`` chooses the step (MARKER_STEP_FORMATS): "cells" as above; "nearness" names no
  cells ("A near 7; B near 3; C near 5. (A)"); "scan" walks the cells of the marker band in reading order and
  writes three rows, one character per cell: the marker in the cell (or -), the nearness of the nearest marker so
  far (LEVEL_SYMBOLS, or -), and that marker's letter (or -), then the answer:
  "--A--B-C--D-----|--KKKMMMMMQQQQQQ|--AAABBBBBDDDDDD. (D)". Every character of a row sits at a fixed distance
  from its cell's image token, depth token and the rows before, so each is a positional read, the kind of lookup
  a tiny model learns from scratch; the nearest marker is the running maximum, carried cell by cell.
* depth: depth-only generation.
* vqa: object count, or the colour of the only object of a kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

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
    step_format: str = "cells"  # MARKER_STEP_FORMATS


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
            means = cell_means(depth, rules.grid)
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


NEARNESS_LEVELS = 10
MARKER_STEP_FORMATS = ("cells", "nearness", "scan")
# The scan rows' nearness levels 0-9, one symbol each: the tiny BPE merges pairs of digits ("10", "55"), which would
# move every later character of a row, so the levels are written as ten capitals it never merges (K far ... T near).
LEVEL_SYMBOLS = "KLMNOPQRST"


def marker_readout(depth: np.ndarray, points: list[list[float]], grid: int) -> list[tuple[int, int, int]]:
    """(row, column, nearness 0-9) of each point's depth-grid cell; nearness from the cell's mean of the
    per-image min-max normalised inverse depth (the map the depth tokenizer encodes: larger is nearer)."""
    h, w = depth.shape
    valid = np.isfinite(depth) & (depth > 0)
    inverse = 1.0 / np.where(valid, depth, np.median(depth[valid]))
    normalised = (inverse - inverse.min()) / max(float(inverse.max() - inverse.min()), 1e-12)
    means = cell_means(normalised, grid)
    out = []
    for x, y in points:
        row, col = min(grid - 1, int(y * grid / h)), min(grid - 1, int(x * grid / w))
        out.append((row, col, nearness_level(means[row, col])))
    return out


def nearness_level(nearness: float) -> int:
    """A normalised inverse depth in [0, 1] (larger is nearer) as the marker step's level 0-9."""
    return min(NEARNESS_LEVELS - 1, max(0, int(NEARNESS_LEVELS * nearness)))


def band_rows(rules: PointRules) -> range:
    """The depth-grid rows the markers can lie in: rules.band at rules.grid."""
    return range(int(rules.band[0] * rules.grid), min(rules.grid - 1, int(rules.band[1] * rules.grid)) + 1)


def scan_rows(readout: list[tuple[int, int, int]], rows: range, grid: int) -> tuple[str, str, str]:
    """The scan step's three rows over the cells of ``rows`` in reading order: the marker in each cell, the
    nearness symbol of the nearest marker so far, its letter ('-' for none / none yet)."""
    at = {(r, c): i for i, (r, c, _) in enumerate(readout)}
    if len(at) < len(readout) or any(r not in rows for r, _, _ in readout):
        raise ValueError(f"scan step: markers {readout} must have their own cells in rows {list(rows)}")
    markers, levels, nearest = [], [], []
    best = None
    for cell in ((r, c) for r in rows for c in range(grid)):
        i = at.get(cell)
        markers.append("-" if i is None else LETTERS[i])
        if i is not None and (best is None or readout[i][2] > readout[best][2]):
            best = i
        levels.append("-" if best is None else LEVEL_SYMBOLS[readout[best][2]])
        nearest.append("-" if best is None else LETTERS[best])
    return "".join(markers), "".join(levels), "".join(nearest)


def marker_step_answer(readout: list[tuple[int, int, int]], closest: int, step_format: str = "cells",
                       rules: PointRules | None = None) -> Optional[str]:
    """The answer with its marker step (``step_format``, MARKER_STEP_FORMATS; "scan" needs the ``rules`` with the
    grid), or None when the nearness levels do not single out ``closest``."""
    levels = [level for _, _, level in readout]
    if any(level >= levels[closest] for i, level in enumerate(levels) if i != closest):
        return None
    if step_format == "scan":
        return f"{'|'.join(scan_rows(readout, band_rows(rules), rules.grid))}. ({LETTERS[closest]})"
    if step_format not in MARKER_STEP_FORMATS:
        raise ValueError(f"unknown marker step format {step_format!r}; one of {MARKER_STEP_FORMATS}")
    where = (lambda r, c: f" at {r},{c}") if step_format == "cells" else (lambda r, c: "")
    steps = "; ".join(f"{LETTERS[i]}{where(r, c)} near {level}" for i, (r, c, level) in enumerate(readout))
    return f"{steps}. ({LETTERS[closest]})"


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
            answer = None
            for _ in range(20 if questions.marker_step else 1):
                found = closest_point_markers(depth, count, draw, questions.points)
                if found is None:
                    break
                points, closest = found
                answer = f"({LETTERS[closest]})" if not questions.marker_step else \
                    marker_step_answer(marker_readout(depth, points, questions.points.grid), closest,
                                       questions.step_format, questions.points)
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
