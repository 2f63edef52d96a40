"""Raw records: what a source adapter yields before preprocessing, one per training sample.

A record is small and JSON-serialisable (it travels through Ray Data): paths and annotations,
never pixels. Decoding, teacher depth and tokenisation happen in the preprocessing stages.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..data.config import TASKS

_KEY_OK = re.compile(r"[^A-Za-z0-9_.-]+")
# The question HardBLINK asks; the synthetic relative-depth task asks the same.
CLOSEST_POINT_QUESTION = (
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?"
)
# How relative-depth markers are drawn (preprocess/stages.draw_markers): "hardblink" as the benchmark does
# (a red ring, the letter in white on black above it); "colour", a toy-only simplification for tiny models
# at low resolution: a filled disc in the letter's own colour (MARKER_COLOURS) with the letter on it.
MARKER_STYLES = ("hardblink", "colour")
# The version of the answers' text format (the spatial chain of thought, the task templates): recorded with every
# shard, so a change of format rebuilds the shards instead of mixing two formats. Change it with the templates.
ANSWER_FORMAT = "perceptio-answers-v1"
DEPTH_QUESTION = "Estimate the depth of this image."
DEPTH_ANSWER = "Here is the depth map."


def safe_key(*parts: Any) -> str:
    """A webdataset-safe sample key (no dots would confuse extensions, so dots become dashes too)."""
    return "_".join(_KEY_OK.sub("-", str(p)).replace(".", "-") for p in parts)


@dataclass
class Record:
    key: str  # unique across the whole preprocessing job
    source: str  # adapter name, e.g. "refcoco", "synthetic"
    task: str  # one of config.TASKS
    image: str  # path of the image file
    turns: list[list[str]]  # [[question, answer], ...]; the image belongs to the first question
    with_seg: bool = False  # the first answer starts with [SEG] (needs `mask`)
    with_depth: bool = False  # the first answer carries a depth block (teacher or ground-truth depth)
    mask: Optional[dict] = None  # {"polygons": [[x0, y0, ...], ...]} | {"rle": {"size": [h, w], "counts": ...}}
    #                              | {"png": path, "value": k} (pixels equal to k)
    depth: Optional[str] = None  # ground-truth metric depth (.npy, metres) aligned with the image
    points: Optional[list[list[float]]] = None  # marker centres (x, y) in pixels, drawn and labelled A, B, ...
    marker_style: str = "hardblink"  # how the points are drawn, one of MARKER_STYLES
    split: str = "train"  # "eval" sources (HardBLINK) are refused by training jobs
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"record {self.key}: unknown task {self.task!r}")
        if self.with_seg and self.mask is None:
            raise ValueError(f"record {self.key}: with_seg needs a mask")
        if not self.turns:
            raise ValueError(f"record {self.key}: no conversation turns")
        if self.marker_style not in MARKER_STYLES:
            raise ValueError(f"record {self.key}: unknown marker_style {self.marker_style!r}; one of {MARKER_STYLES}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        return cls(**data)
