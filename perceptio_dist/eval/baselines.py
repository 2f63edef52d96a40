"""What a relative-depth score has to beat, and whether the question can be read at the model's input.

Baselines per group (reference answers only, no model): ``chance`` (1 / number of points, averaged),
``lowest_marker`` (always the point lowest in the image: the camera looks down, so it is often the
nearest) and ``most_frequent_letter`` (always the group's most frequent reference letter).

Legibility per group (items with marker positions): ``label_px_at_input``, the median height in pixels
of what identifies a marker (its letter, or its coloured disc) once the image is resized onto one tile (the whole image at max_tiles 1, the
thumbnail otherwise), and ``shared_cell``, the share of items in which two markers fall into the same
cell of the depth grid (then even perfect depth tokens cannot say which of them is nearer).
"""

from __future__ import annotations

import string
from collections import Counter

import numpy as np

from ..preprocess.stages import marker_label_size
from .benchmarks import EvalItem
from .scoring import parse_choice_letter


def relative_depth_baselines(items: list[EvalItem]) -> dict[str, float]:
    letters = [parse_choice_letter(item.answer, item.num_choices) for item in items]
    out = {"chance": float(np.mean([1.0 / item.num_choices for item in items]))}
    with_points = [(item, letter) for item, letter in zip(items, letters) if item.points]
    if with_points:
        lowest = [string.ascii_uppercase[int(np.argmax([y for _, y in item.points]))] == letter
                  for item, letter in with_points]
        out["lowest_marker"] = float(np.mean(lowest))
    out["most_frequent_letter"] = Counter(letters).most_common(1)[0][1] / len(letters)
    return out


def legibility(items: list[EvalItem], tile_size: int, depth_grid: int) -> dict[str, float] | None:
    with_points = [item for item in items if item.points]
    if not with_points:
        return None
    heights, shared = [], []
    for item in with_points:
        height, width = item.image.shape[:2]
        heights.append(marker_label_size(width, item.marker_style) * tile_size / height)
        cells = {(int(x * depth_grid / width), int(y * depth_grid / height)) for x, y in item.points}
        shared.append(len(cells) < len(item.points))
    return {"label_px_at_input": float(np.median(heights)), "shared_cell": float(np.mean(shared))}


def baselines_table(metrics: dict) -> list[str]:
    """Markdown: each relative-depth group's accuracy beside its baselines and its legibility."""
    groups = [(name, m) for name, m in metrics.items() if "baselines" in m]
    if not groups:
        return []
    lines = ["", "## Baselines and legibility", "",
             "Accuracy (%) against answering by chance, always the lowest marker, always the most frequent "
             "letter; the marker letters' height in pixels at the model's input and the share of questions with "
             "two markers in one depth-grid cell; the model's answers counted by letter.", "",
             "| group | model | chance | lowest marker | most frequent letter | label px at input | shared cell | "
             "answers by letter |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, m in groups:
        b, leg = m["baselines"], m.get("legibility") or {}
        cell = lambda d, k, scale=100, fmt=".1f": f"{scale * d[k]:{fmt}}" if k in d else "–"  # noqa: E731
        lines.append(f"| {name} | {100 * m['accuracy']:.1f} | {cell(b, 'chance')} | {cell(b, 'lowest_marker')} | "
                     f"{cell(b, 'most_frequent_letter')} | {cell(leg, 'label_px_at_input', 1)} | "
                     f"{cell(leg, 'shared_cell')} | "
                     f"{' '.join(f'{k} {v}' for k, v in (m.get('answer_letters') or {}).items()) or '–'} |")
    return lines
