"""Typed YAML: a parsed recipe checked against a config dataclass's annotations, field by field, with a message that
names the field and the type it wants.

A union of dataclasses is a tagged union: each member declares ``type: Literal["<its name>"]``, and a mapping's
``type`` key picks the member (the first member when it is missing), so each kind holds only its own fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from .extensions import extended, extension_fields
from .fields import ConfigError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {type_name(key)} to {type_name(value)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


TAG = "type"


def tagged_members(tp: Any) -> dict[str, type]:
    """{tag: member} of a tagged union annotation (a union of dataclasses), {} for any other annotation."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return {}
    members = typing.get_args(tp)
    if not all(dataclasses.is_dataclass(m) for m in members):
        return {}
    return {typing.get_args(typing.get_type_hints(m)[TAG])[0]: m for m in members}


def _build_tagged(value: Any, members: dict[str, type], path: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"Config error at '{path}': expected a mapping with a '{TAG}' key "
                          f"({', '.join(map(repr, members))}), got {value!r}.")
    tag = value.get(TAG, next(iter(members)))
    if tag not in members:
        raise ConfigError(f"Config error at '{path}.{TAG}': expected one of {', '.join(map(repr, members))}, "
                          f"got {tag!r}.")
    return build_dataclass(members[tag], value, path)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widened to floats)."""

    def fail() -> ConfigError:
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        return ConfigError(
            f"Config error at '{path}': expected {type_name(tp)}, got {shown} ({type(value).__name__}). "
            f"Fix it in the recipe or override it on the command line, e.g. {path}=<value>."
        )

    origin = typing.get_origin(tp)
    members = tagged_members(tp)
    if members:
        return _build_tagged(value, members, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return build_dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            if value is None:
                raise fail()
            try:
                return _coerce(value, non_none[0], path)
            except ConfigError:
                raise fail() from None
        raise fail()
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{path}.{k}"): _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module, not a user mistake


def build_dataclass(cls: type, data: dict, path: str) -> Any:
    """``cls`` from a mapping, every value type-checked; keys an experiment registered for ``cls``
    (config/extensions.py) extend it."""
    own = {f.name for f in dataclasses.fields(cls)}
    added = [key for key in data if key not in own and key in extension_fields(cls)]
    if added:
        cls = extended(cls, tuple(added))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(f"Config error: unknown key '{where}'.{hint} Known keys here: {known}.")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"Config error: required key '{sub}' is missing ({f.metadata.get('doc', '')}).")
    for name in added:  # an experiment's own checks of its fields
        check = extension_fields(cls)[name].check
        if check is not None:
            check(kwargs[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def normalise_numbers(data: Any) -> Any:
    """YAML 1.1 reads '1e-4' as a string; turn such strings back into floats before type checking."""
    if isinstance(data, dict):
        return {k: normalise_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [normalise_numbers(v) for v in data]
    if isinstance(data, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", data):
        return float(data)
    return data
