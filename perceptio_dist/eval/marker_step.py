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
cells, as many as the item has markers.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import chain

STEP = re.compile(r"\b([A-Z]) at (\d+),(\d+) near (\d+)")


def parse_marker_step(text: str) -> dict[str, tuple[int, int, int]]:
    """{letter: (row, column, nearness)} of every "X at r,c near n" in ``text``, first mention of each letter."""
    out: dict[str, tuple[int, int, int]] = {}
    for letter, row, col, near in STEP.findall(text):
        out.setdefault(letter, (int(row), int(col), int(near)))
    return out


def marker_step_scores(reference: str, prediction: str) -> dict | None:
    """The prediction's marker step against the reference's (None: the reference has none)."""
    truth = parse_marker_step(reference)
    if not truth:
        return None
    named = parse_marker_step(prediction)
    found = Counter(cell[:2] for cell in truth.values()) & Counter(cell[:2] for cell in named.values())
    return {"markers": len(truth),
            "cells": sum(named.get(k, (None, None))[:2] == cell[:2] for k, cell in truth.items()),
            "nearness": sum(k in named and named[k][2] == cell[2] for k, cell in truth.items()),
            "found": sum(found.values()),
            "listed": set(named) == set(truth)}


def group_marker_scores(pairs: list[tuple[str, str]]) -> dict:
    """Per-group shares over (reference, prediction) answers whose reference has a marker step."""
    scored = [(parse_marker_step(ref), marker_step_scores(ref, pred)) for ref, pred in pairs]
    scored = [(truth, s) for truth, s in scored if s is not None]
    truths = [truth for truth, _ in scored]
    markers = sum(s["markers"] for _, s in scored)
    by_letter: dict[str, Counter] = {}
    for truth in truths:
        for letter, (row, col, _) in truth.items():
            by_letter.setdefault(letter, Counter())[(row, col)] += 1
    mode = {letter: counts.most_common(1)[0][0] for letter, counts in by_letter.items()}
    mode_right = sum(mode[letter] == (row, col) for truth in truths for letter, (row, col, _) in truth.items())
    frequent = [cell for cell, _ in Counter(chain.from_iterable(
        [cell[:2] for cell in truth.values()] for truth in truths)).most_common()]
    found_mode = sum(sum((Counter(cell[:2] for cell in truth.values()) & Counter(frequent[:len(truth)])).values())
                     for truth in truths)
    share = lambda key: sum(s[key] for _, s in scored) / markers  # noqa: E731
    return {"marker_cells": share("cells"), "marker_nearness": share("nearness"), "marker_found": share("found"),
            "marker_listed": sum(s["listed"] for _, s in scored) / len(scored),
            "marker_cells_mode": mode_right / markers, "marker_found_mode": found_mode / markers,
            "marker_count": markers, "marker_items": len(scored)}


def marker_step_table(metrics: dict) -> list[str]:
    """Markdown: per group with marker steps, how often the answers find the markers."""
    groups = [(name, m) for name, m in metrics.items() if "marker_cells" in m]
    if not groups:
        return []
    lines = ["", "## Does the answer find the markers?", "",
             "The marker step of each answer (\"A at 3,5 near 7; ...\") against the reference's (%): markers whose cell "
             "it names right, beside the shortcut of naming each letter's most frequent cell in these references; "
             "markers whose cell it names for any letter, beside naming the references' most frequent cells; "
             "markers whose nearness level it names right; answers listing exactly the right letters.", "",
             "| group | cells right | most frequent cell per letter | cells found, any letter | most frequent cells | "
             "nearness right | right letters listed | markers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in groups:
        lines.append(f"| {name} | {100 * m['marker_cells']:.1f} | {100 * m['marker_cells_mode']:.1f} | "
                     f"{100 * m['marker_found']:.1f} | {100 * m['marker_found_mode']:.1f} | "
                     f"{100 * m['marker_nearness']:.1f} | {100 * m['marker_listed']:.1f} | {m['marker_count']} |")
    return lines
