"""The configuration reference, generated from the fields' own documentation (``perceptio-config --explain``,
docs/configuration.md), and a config written back as YAML."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from .typed_yaml import type_name

def iter_field_docs(cls: type, prefix: str = ""):
    """Yield (dotted name, type name, default, doc) for every leaf field, for --explain and docs/configuration.md."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_field_docs(tp, name + ".")
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            yield name, f"a list of {item.__name__}", [], f.metadata.get("doc", "")
            yield from iter_field_docs(item, name + "[].")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        yield name, type_name(tp), default, f.metadata.get("doc", "")


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)