"""The marker-step answer format of the toy world's relative-depth questions, written and read back in one place.

Written at preprocessing (``sources[synthetic].marker_step``): the answer first reads every marker out of the
depth grid (cell row,column, nearness 0-9 = the cell's mean normalised inverse depth in tenths), then answers;
only marker sets whose closest marker has the strictly highest nearness are kept. Read back at evaluation: does the
answer find the markers? "A at 3,5 near 7; B at 3,1 near 3; C at 4,6 near 5. (A)": the letter alone cannot tell a model that finds
the markers and misreads their depth from one that does not find them; the step can. Per item:

* ``cells``     markers whose grid cell the answer names as the reference does;
* ``nearness``  markers whose nearness level (0-9) it names as the reference does;
* ``found``      markers whose cell it names for any letter (each named cell matched once): a model that finds the
  markers but binds the letters wrongly scores here and not in ``cells``;
* ``listed``    whether it names exactly the reference's letters (neither one missing nor one extra);
* ``running``   scan steps only: the characters of the running rows (nearest level and letter so far) it writes
  as the reference does, of all of them.

A letter named twice counts with its first mention. Per group: ``marker_cells`` and ``marker_nearness`` are shares
of all the reference's markers, ``marker_listed`` the share of answers, ``marker_running`` the share of running-row
characters. The shortcut to beat is ``marker_cells_mode``: naming, for every letter, the cell that letter has most
often in the group's own references (the "memorised cells" answer); ``marker_found_mode``, its counterpart for
``found``, names the group's most frequent cells, as many as the item has markers; ``marker_nearness_mode`` names
each letter's most frequent level.

The three step forms (``marker_step_format``): "cells" as above; "nearness" ("A near 7; B near 3. (A)") has no
cells, so its cell scores are None; "scan" ("--A--B--|--KKKMMM|--AAABBB. (B)") names a marker's cell by its place
in the first row and its own level only where it becomes the nearest so far, so its nearness scores are None and
``running`` scores the rest.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import numpy as np

from ...preprocess.scenes.tasks import LETTERS, PointRules, QuestionRules, cell_means
from ...registry import ANSWER_FORMATS, EVAL_DIAGNOSTICS

# ----------------------------------------------------------------------------------------------- writing

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


# ----------------------------------------------------------------------------------------------- reading

STEP = re.compile(r"\b([A-Z])(?: at (\d+),(\d+))? near (\d+)")
SCAN = re.compile(r"([A-E-]+)\|([K-T-]+)\|([A-E-]+)")


@dataclass(frozen=True)
class MarkerStep:
    """One answer's marker step: per letter its cell ((row, column), or (place in the scan row,), or None) and
    nearness level (or None); for a scan step also its running rows (levels, letters)."""

    cells: dict[str, Optional[tuple]]
    levels: dict[str, Optional[int]]
    running: Optional[str] = None


def parse_marker_step(text: str) -> MarkerStep:
    """The marker step in ``text``, of any form (empty when it has none); a letter named twice counts once, first."""
    scan = SCAN.search(text)
    if scan:
        markers, levels, letters = scan.groups()
        cells: dict[str, Optional[tuple]] = {}
        for place, letter in enumerate(markers):
            if letter != "-":
                cells.setdefault(letter, (place,))
        return MarkerStep(cells, {letter: None for letter in cells}, running=levels + letters)
    cells, levels = {}, {}
    for letter, row, col, near in STEP.findall(text):
        if letter not in cells:
            cells[letter] = (int(row), int(col)) if row else None
            levels[letter] = int(near)
    return MarkerStep(cells, levels)


def marker_step_scores(reference: str, prediction: str) -> dict | None:
    """The prediction's marker step against the reference's (None: the reference has none)."""
    truth = parse_marker_step(reference)
    if not truth.cells:
        return None
    named = parse_marker_step(prediction)
    with_cells = all(cell is not None for cell in truth.cells.values())
    with_levels = all(level is not None for level in truth.levels.values())
    found = Counter(truth.cells.values()) & Counter(cell for cell in named.cells.values() if cell is not None)
    running = None
    if truth.running is not None:
        mine = named.running or ""
        running = sum(a == b for a, b in zip(truth.running, mine)) if len(mine) == len(truth.running) else 0
    return {"markers": len(truth.cells),
            "cells": sum(named.cells.get(k) == cell for k, cell in truth.cells.items()) if with_cells else None,
            "nearness": sum(named.levels.get(k) == level for k, level in truth.levels.items()) if with_levels
            else None,
            "found": sum(found.values()) if with_cells else None,
            "listed": set(named.cells) == set(truth.cells),
            "running": running, "running_of": None if truth.running is None else len(truth.running)}


def _per_letter_mode(truths: list[dict], scored: int) -> Optional[float]:
    """Share of ``scored`` markers a constant answer gets right that names, for every letter, its most frequent
    value in ``truths`` ({letter: value} per item); None when the values are unknown."""
    if any(value is None for truth in truths for value in truth.values()):
        return None
    by_letter: dict[str, Counter] = {}
    for truth in truths:
        for letter, value in truth.items():
            by_letter.setdefault(letter, Counter())[value] += 1
    mode = {letter: counts.most_common(1)[0][0] for letter, counts in by_letter.items()}
    return sum(mode[letter] == value for truth in truths for letter, value in truth.items()) / scored


def group_marker_scores(pairs: list[tuple[str, str]]) -> dict:
    """Per-group shares over (reference, prediction) answers whose reference has a marker step."""
    scored = [(parse_marker_step(ref), marker_step_scores(ref, pred)) for ref, pred in pairs]
    scored = [(truth, s) for truth, s in scored if s is not None]
    truths = [truth for truth, _ in scored]
    markers = sum(s["markers"] for _, s in scored)

    def share(key: str, of: str | None = None) -> Optional[float]:
        if any(s[key] is None for _, s in scored):
            return None
        return sum(s[key] for _, s in scored) / (sum(s[of] for _, s in scored) if of else markers)

    out = {"marker_cells": share("cells"), "marker_nearness": share("nearness"), "marker_found": share("found"),
           "marker_listed": sum(s["listed"] for _, s in scored) / len(scored),
           "marker_running": share("running", "running_of"),
           "marker_cells_mode": _per_letter_mode([t.cells for t in truths], markers),
           "marker_nearness_mode": _per_letter_mode([t.levels for t in truths], markers),
           "marker_found_mode": None, "marker_count": markers, "marker_items": len(scored)}
    if out["marker_cells"] is not None:
        frequent = [cell for cell, _ in Counter(chain.from_iterable(t.cells.values() for t in truths)).most_common()]
        out["marker_found_mode"] = sum(sum((Counter(t.cells.values()) & Counter(frequent[:len(t.cells)])).values())
                                       for t in truths) / markers
    return out


def marker_step_table(metrics: dict) -> list[str]:
    """Markdown: per group with marker steps, how often the answers find the markers."""
    groups = [(name, m) for name, m in metrics.items() if "marker_nearness" in m]
    if not groups:
        return []
    pct = lambda value: "–" if value is None else f"{100 * value:.1f}"  # noqa: E731
    lines = ["", "## Does the answer find the markers?", "",
             "The marker step of each answer (\"A at 3,5 near 7; ...\", \"A near 7; ...\" or the scan rows "
             "\"--A--B--|--KKKMMM|--AAABBB\") against the reference's (%): markers whose cell it names right, beside "
             "the shortcut of naming each letter's most frequent cell in these references; markers whose cell it "
             "names for any letter, beside naming the references' most frequent cells; markers whose nearness level "
             "it names right, beside naming each letter's most frequent level; answers listing exactly the right "
             "letters; characters of the scan's running rows (nearest level and letter so far) right. – : not in "
             "this step's form.", "",
             "| group | cells right | most frequent cell per letter | cells found, any letter | most frequent cells | "
             "nearness right | most frequent level per letter | right letters listed | running rows right | markers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in groups:
        lines.append(f"| {name} | {pct(m['marker_cells'])} | {pct(m['marker_cells_mode'])} | "
                     f"{pct(m['marker_found'])} | {pct(m['marker_found_mode'])} | "
                     f"{pct(m['marker_nearness'])} | {pct(m.get('marker_nearness_mode'))} | "
                     f"{pct(m['marker_listed'])} | {pct(m.get('marker_running'))} | {m['marker_count']} |")
    return lines


# ----------------------------------------------------------------------------------------------- registered parts


class MarkerStepAnswer:
    """The answer format (registry.ANSWER_FORMATS): the marker step in ``rules.step_format``, then the letter."""

    attempts = 20  # marker sets drawn until one whose levels single out the closest marker

    def write(self, depth: np.ndarray, points: list[list[float]], closest: int, rules: QuestionRules) -> Optional[str]:
        readout = marker_readout(depth, points, rules.points.grid)
        return marker_step_answer(readout, closest, rules.step_format, rules.points)


class MarkerStepDiagnostic:
    """The evaluation diagnostic (registry.EVAL_DIAGNOSTICS): only items whose reference has a marker step."""

    row_key = "marker_step"

    def score_row(self, reference: str, prediction: str) -> dict | None:
        return marker_step_scores(reference, prediction)

    def summarise(self, pairs: list[tuple[str, str]]) -> dict:
        return group_marker_scores(pairs)

    def table(self, metrics: dict) -> list[str]:
        return marker_step_table(metrics)


ANSWER_FORMATS.register("marker_step", MarkerStepAnswer())
EVAL_DIAGNOSTICS.register("marker_step", MarkerStepDiagnostic())
