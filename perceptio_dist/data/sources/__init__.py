"""Source adapters: each turns one raw dataset layout into :class:`~perceptio_dist.data.records.Record`s."""

from __future__ import annotations

from itertools import islice
from typing import Callable, Iterator

from ..preprocess_config import SourceConfig
from ..records import Record
from .coco import iter_coco
from .hardblink import iter_hardblink
from .image_folder import iter_image_folder
from .llava import iter_llava
from .refcoco import iter_refcoco
from .synthetic import iter_synthetic

ADAPTERS: dict[str, Callable[[SourceConfig], Iterator[Record]]] = {
    "synthetic": iter_synthetic,
    "refcoco": iter_refcoco,
    "coco": iter_coco,
    "llava": iter_llava,
    "image_folder": iter_image_folder,
    "hardblink": iter_hardblink,
}


def iter_source(spec: SourceConfig) -> Iterator[Record]:
    records = ADAPTERS[spec.type](spec)
    return islice(records, spec.max_records) if spec.max_records is not None else records
