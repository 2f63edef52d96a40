"""Does the answer find the markers? The marker step of relative-depth answers scored against the reference's.

With ``marker_step`` (preprocess/scenes/tasks.py) an answer first reads every marker out of the depth grid, then
answers: "A at 3,5 near 7; B at 3,1 near 3; C at 4,6 near 5. (A)". The letter alone cannot tell a model that finds
the markers and misreads their depth from one that does not find them; the step can. Per item:

* ``cells``     markers whose grid cell (row, column) the answer names as the reference does;
* ``nearness``  markers whose nearness level (0-9) it names as the reference does;
* ``found``      markers whose cell it names for any letter (each named cell matched once): a model that finds the
  markers but binds the letters wrongly scores here and not in ``cells``;
* ``listed``    whether it names exactly the reference's letters (neither one missing nor one extra).

A letter named twice counts with its first mention. Per group: ``marker_cells`` and ``marker_nearness`` are shares
of all the reference's markers, ``marker_listed`` the share of answers. The shortcut to beat is
``marker_cells_mode``: naming, for every letter, the cell that letter has most often in the group's own references
(the "memorised cells" answer); ``marker_found_mode``, its counterpart for ``found``, names the group's most frequent
cells, as many as the item has markers; ``marker_nearness_mode`` names each letter's most frequent level.

A step without cells ("A near 7; B near 3. (A)", ``marker_cells: false``) is scored on nearness and letters only:
its cell scores are None.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import chain

STEP = re.compile(r"\b([A-Z])(?: at (\d+),(\d+))? near (\d+)")

Cell = tuple  # (row, column), or (None, None) for a step without cells


def parse_marker_step(text: str) -> dict[str, tuple]:
    """{letter: (row, column, nearness)} of every "X at r,c near n" or "X near n" in ``text`` (row and column None
    in the second form), first mention of each letter."""
    out: dict[str, tuple] = {}
    for letter, row, col, near in STEP.findall(text):
        cell = (int(row), int(col)) if row else (None, None)
        out.setdefault(letter, (*cell, int(near)))
    return out


def _has_cells(step: dict[str, tuple]) -> bool:
    return any(value[0] is not None for value in step.values())


def marker_step_scores(reference: str, prediction: str) -> dict | None:
    """The prediction's marker step against the reference's (None: the reference has none)."""
    truth = parse_marker_step(reference)
    if not truth:
        return None
    named = parse_marker_step(prediction)
    scores = {"markers": len(truth), "cells": None, "found": None,
              "nearness": sum(k in named and named[k][2] == cell[2] for k, cell in truth.items()),
              "listed": set(named) == set(truth)}
    if _has_cells(truth):
        found = Counter(cell[:2] for cell in truth.values()) & Counter(cell[:2] for cell in named.values())
        scores["cells"] = sum(named.get(k, (None, None))[:2] == cell[:2] for k, cell in truth.items())
        scores["found"] = sum(found.values())
    return scores


def _per_letter_mode(truths: list[dict[str, tuple]], part) -> int:
    """Markers a constant answer gets right that names, for every letter, its most frequent ``part`` (of
    (row, column, nearness)) in ``truths``."""
    by_letter: dict[str, Counter] = {}
    for truth in truths:
        for letter, value in truth.items():
            by_letter.setdefault(letter, Counter())[part(value)] += 1
    mode = {letter: counts.most_common(1)[0][0] for letter, counts in by_letter.items()}
    return sum(mode[letter] == part(value) for truth in truths for letter, value in truth.items())


def group_marker_scores(pairs: list[tuple[str, str]]) -> dict:
    """Per-group shares over (reference, prediction) answers whose reference has a marker step."""
    scored = [(parse_marker_step(ref), marker_step_scores(ref, pred)) for ref, pred in pairs]
    scored = [(truth, s) for truth, s in scored if s is not None]
    truths = [truth for truth, _ in scored]
    markers = sum(s["markers"] for _, s in scored)
    share = lambda key: sum(s[key] for _, s in scored) / markers  # noqa: E731
    out = {"marker_nearness": share("nearness"),
           "marker_listed": sum(s["listed"] for _, s in scored) / len(scored),
           "marker_nearness_mode": _per_letter_mode(truths, lambda v: v[2]) / markers,
           "marker_cells": None, "marker_found": None, "marker_cells_mode": None, "marker_found_mode": None,
           "marker_count": markers, "marker_items": len(scored)}
    if all(s["cells"] is not None for _, s in scored):
        frequent = [cell for cell, _ in Counter(chain.from_iterable(
            [cell[:2] for cell in truth.values()] for truth in truths)).most_common()]
        found_mode = sum(sum((Counter(cell[:2] for cell in truth.values()) & Counter(frequent[:len(truth)])).values())
                         for truth in truths)
        out.update(marker_cells=share("cells"), marker_found=share("found"),
                   marker_cells_mode=_per_letter_mode(truths, lambda v: v[:2]) / markers,
                   marker_found_mode=found_mode / markers)
    return out


def marker_step_table(metrics: dict) -> list[str]:
    """Markdown: per group with marker steps, how often the answers find the markers."""
    groups = [(name, m) for name, m in metrics.items() if "marker_nearness" in m]
    if not groups:
        return []
    pct = lambda value: "–" if value is None else f"{100 * value:.1f}"  # noqa: E731
    lines = ["", "## Does the answer find the markers?", "",
             "The marker step of each answer (\"A at 3,5 near 7; ...\" or, without cells, \"A near 7; ...\") "
             "against the reference's (%): markers whose cell it names right, beside the shortcut of naming each "
             "letter's most frequent cell in these references; markers whose cell it names for any letter, beside "
             "naming the references' most frequent cells; markers whose nearness level it names right, beside naming "
             "each letter's most frequent level; answers listing exactly the right letters. – : the step names no "
             "cells.", "",
             "| group | cells right | most frequent cell per letter | cells found, any letter | most frequent cells | "
             "nearness right | most frequent level per letter | right letters listed | markers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in groups:
        lines.append(f"| {name} | {pct(m['marker_cells'])} | {pct(m['marker_cells_mode'])} | "
                     f"{pct(m['marker_found'])} | {pct(m['marker_found_mode'])} | "
                     f"{pct(m['marker_nearness'])} | {pct(m.get('marker_nearness_mode'))} | "
                     f"{pct(m['marker_listed'])} | {m['marker_count']} |")
    return lines
