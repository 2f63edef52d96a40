"""Evaluation items from the benchmark files: HardBLINK, held-out synthetic scenes, RefCOCO/+/g (refer
layout) and MMBench-style multiple-choice TSVs. Images are decoded (and markers drawn) exactly as the
preprocessing job does for training, so the model sees evaluation images the way it saw training ones."""

from __future__ import annotations

import base64
import csv
import io
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ..data.shards import npy_load
from ..preprocess.config import HardblinkSource, RefcocoSource, SyntheticSource
from ..preprocess.stages import decode_row
from ..preprocess.records import Record

# The real HardBLINK files next to the repository (../shared/data/hardblink), read only, never copied.
DEFAULT_HARDBLINK = Path(__file__).resolve().parents[3] / "shared" / "data" / "hardblink"


@dataclass
class EvalItem:
    group: str  # metric group: hardblink_3, synthetic_depth_4, synthetic_refer, refcoco_testA, mmbench, ...
    key: str
    image: np.ndarray  # H x W x 3 uint8, markers drawn
    question: str
    answer: str  # the reference answer ("(B)", a letter, or the referring expression's target description)
    task: str  # relative_depth | referring_seg | multiple_choice
    num_choices: int = 0
    mask: np.ndarray | None = None  # H x W bool (referring segmentation)
    points: list[list[float]] | None = None  # marker centres (x, y) in this image's pixels, labelled A, B, ...
    gt_depth: np.ndarray | None = None  # ground-truth metric depth aligned with the image (synthetic scenes)
    marker_style: str = "hardblink"  # how the points were drawn (preprocess/records.MARKER_STYLES)


def _item_from_record(record: Record, group: str) -> EvalItem:
    row = decode_row({"record": json.dumps(record.to_dict())})
    if row["error"]:
        raise ValueError(f"{record.key}: {row['error']}")
    image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
    mask = np.asarray(Image.open(io.BytesIO(row["mask"]))) > 127 if row["mask"] else None
    question, answer = record.turns[0]
    points = record.meta.get("num_points") or (len(record.points) if record.points else 0)
    task = "relative_depth" if record.task == "relative_depth" else "referring_seg"
    drawn = json.loads(row["record"]).get("points")  # scaled with the image when it was downscaled
    gt_depth = npy_load(row["gt_depth"]).astype(np.float32) if row["gt_depth"] else None
    return EvalItem(group, record.key, image, question, answer, task, int(points), mask, drawn, gt_depth,
                    record.marker_style)


def hardblink_items(path: str | Path) -> Iterator[EvalItem]:
    from ..preprocess.sources.hardblink import iter_hardblink

    for record in iter_hardblink(HardblinkSource(path=str(path))):
        yield _item_from_record(record, f"hardblink_{record.meta['num_points']}")


def synthetic_items(scenes: str | Path, questions: dict | None = None) -> Iterator[EvalItem]:
    """Relative depth (3/4/5 points) and referring segmentation from rendered scenes (held-out seeds).

    ``questions``: the synthetic source's question fields the model was trained with (export's questions.json:
    marker style, grid, sets per scene, point counts); none: the defaults."""
    from ..preprocess.sources.synthetic import iter_synthetic

    spec = SyntheticSource(path=str(scenes), tasks=["relative_depth", "referring_seg"],
                        **(questions or {}))
    for record in iter_synthetic(spec):
        if record.task == "relative_depth":
            yield _item_from_record(record, f"synthetic_depth_{len(record.points)}")
        else:
            yield _item_from_record(record, "synthetic_refer")


def refcoco_items(path: str | Path, dataset: str, split_by: str, splits: Iterable[str],
                  images: str | None = None) -> Iterator[EvalItem]:
    from ..preprocess.sources.refcoco import iter_refcoco

    for split in splits:
        spec = RefcocoSource(path=str(path), dataset=dataset, split_by=split_by, splits=[split],
                            images=images)
        for record in iter_refcoco(spec):
            yield _item_from_record(record, f"{dataset}_{split}")


CIRCULAR_GROUP = "mmbench_circular"
CIRCULAR_SEPARATOR = "@"  # item key: mmbench_<index>@<rotation>


def mmbench_items(tsv: str | Path, circular: bool = False) -> Iterator[EvalItem]:
    """MMBench-style TSV: index, question, hint (optional), A, B, C, D (E...), answer, image (base64).

    ``circular``: VLMEvalKit's CircularEval. A question with n options is asked n times, the option texts
    rotated by 0..n-1 places under fixed letters (rotation k puts original option (i + k) mod n at letter i, so
    the right letter moves with it); it counts as right only if every rotation is answered right. The items go
    to group ``mmbench_circular``; rotation 0 is the single pass (eval/run.py scores both)."""
    csv.field_size_limit(sys.maxsize)
    with open(tsv, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = [(letter, row[letter]) for letter in string.ascii_uppercase
                       if row.get(letter) not in (None, "", "nan")]
            if not options:
                raise ValueError(f"{tsv}: row {row.get('index')} has no options A, B, ...")
            letters = [letter for letter, _ in options]
            answer = row["answer"].strip()
            if answer not in letters:
                raise ValueError(f"{tsv}: row {row.get('index')} answers {answer!r}, not one of {letters}")
            hint = row.get("hint") or ""
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB"))
            for k in range(len(options) if circular else 1):
                texts = [options[(i + k) % len(options)][1] for i in range(len(options))]
                lines = ([hint] if hint and hint != "nan" else []) + [row["question"]]
                lines += [f"{letter}. {text}" for letter, text in zip(letters, texts)]
                lines.append("Answer with the option's letter from the given choices directly.")
                right = letters[(letters.index(answer) - k) % len(options)]
                group, key = ((CIRCULAR_GROUP, f"mmbench_{row['index']}{CIRCULAR_SEPARATOR}{k}") if circular
                              else ("mmbench", f"mmbench_{row['index']}"))
                yield EvalItem(group, key, image, "\n".join(lines), right, "multiple_choice", len(options))
