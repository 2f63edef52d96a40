"""The configuration reference, generated from the fields' own documentation (``perceptio-config --explain``,
docs/configuration.md), and a config written back as YAML."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from .typed_yaml import TAG, tagged_members, type_name

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
        members = tagged_members(item)
        if members:  # fields every kind has under name[], each kind's own under name[<kind>]
            yield name, f"a list of {' or '.join(m.__name__ for m in members.values())}", [], f.metadata.get("doc", "")
            shared = set.intersection(*({g.name for g in dataclasses.fields(m)} for m in members.values()))
            first = next(iter(members.values()))
            for row in iter_field_docs(first, name + "[]."):
                if row[0].endswith(f".{TAG}"):  # documented once, on the members' common base
                    doc = next(f.metadata["doc"] for base in first.__mro__ if dataclasses.is_dataclass(base)
                               for f in dataclasses.fields(base) if f.name == TAG and "doc" in f.metadata)
                    yield row[0], "one of " + ", ".join(map(repr, members)), row[2], doc
                elif row[0].split(".")[-1] in shared:
                    yield row
            for tag, member in members.items():
                yield from (row for row in iter_field_docs(member, f"{name}[{tag}].")
                            if row[0].split(".")[-1] not in shared)
            continue
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

def iter_extension_docs(cls: type, prefix: str = ""):
    """Like :func:`iter_field_docs` for the fields experiments registered (config/extensions.py) in ``cls``'s
    sections, each doc ending with the experiment that owns it."""
    from .extensions import extension_fields

    for name, field in sorted(extension_fields(cls).items()):
        yield f"{prefix}{name}", type_name(field.type), field.default, f"{field.doc} (experiment: {field.owner})"
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_extension_docs(hints[f.name], f"{prefix}{f.name}.")
