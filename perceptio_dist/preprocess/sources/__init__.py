"""Source adapters: each turns one raw dataset layout into :class:`~perceptio_dist.preprocess.records.Record`s.

The source types are declared once, as the members of ``preprocess.config.SourceConfig`` (a tagged union: each
type's dataclass holds only its own fields); the adapter of type ``name`` is the function ``iter_<name>`` of the
module ``sources/<name>.py``.
"""

from __future__ import annotations

import importlib
from itertools import islice
from typing import Callable, Iterator

from ..config import SOURCE_TYPES, SourceConfig
from ..records import Record


def adapter(source_type: str) -> Callable[[SourceConfig], Iterator[Record]]:
    """The adapter function of a registered source type."""
    if source_type not in SOURCE_TYPES:
        raise ValueError(f"unknown source type {source_type!r}; registered: {', '.join(SOURCE_TYPES)}")
    module = importlib.import_module(f"{__name__}.{source_type}")
    return getattr(module, f"iter_{source_type}")


def iter_source(spec: SourceConfig) -> Iterator[Record]:
    records = adapter(spec.type)(spec)
    return islice(records, spec.max_records) if spec.max_records is not None else records
