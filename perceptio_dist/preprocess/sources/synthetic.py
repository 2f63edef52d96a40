"""Rendered scene folders (perceptio-scenes) -> records for the tasks listed in the source config."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import SyntheticSource
from ..records import Record
from ..scenes.render import load_scene_meta
from ..scenes.tasks import scene_records


def iter_synthetic(spec: SyntheticSource) -> Iterator[Record]:
    root = Path(spec.path)
    rules = spec.question_rules()
    for folder in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        depth = np.load(folder / "depth.npy", allow_pickle=False)
        yield from scene_records(folder, load_scene_meta(folder), depth, spec.tasks, rules)
