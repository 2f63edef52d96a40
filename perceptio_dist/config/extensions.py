"""Config fields that experiments add to the components' sections, under the sections' own dotted keys.

An experiment registers a field of a section (e.g. ``position_init`` of the vision tower's architecture); the core's
sections do not declare it, so the core's recipes, dumps and reference never show it. A recipe, checkpoint or
export that sets it gets a section extended by the fields it sets (a subclass of the section, made once per set of
fields); :func:`extension_value` reads a field, or its default where the config does not set it. Only the
experiment that registered a field reads it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..registry import load_experiments
from .fields import doc_field


@dataclass(frozen=True)
class ExtensionField:
    name: str
    type: Any
    default: Any
    doc: str
    owner: str  # the experiment that registered it
    check: Optional[Callable[[Any, str], None]] = None  # (value, dotted name): raises ConfigError when wrong


_FIELDS: dict[type, dict[str, ExtensionField]] = {}
_EXTENDED: dict[tuple[type, tuple[str, ...]], type] = {}


def register_field(section: type, name: str, type_: Any, default: Any, doc: str, owner: str,
                   check: Optional[Callable[[Any, str], None]] = None) -> None:
    own = {f.name for f in dataclasses.fields(section)}
    if name in own:
        raise ValueError(f"{section.__name__} already declares {name!r}")
    _FIELDS.setdefault(section, {})[name] = ExtensionField(name, type_, default, doc, owner, check)


def extension_fields(section: type) -> dict[str, ExtensionField]:
    """The fields experiments registered for ``section`` (or the section it extends)."""
    load_experiments()
    base = getattr(section, "__extends__", section)
    return _FIELDS.get(base, {})


def extended(section: type, names: tuple[str, ...]) -> type:
    """``section`` with the registered fields ``names`` added (made once per set of names)."""
    key = (section, tuple(sorted(names)))
    if key not in _EXTENDED:
        registered = extension_fields(section)
        added = [(name, registered[name].type, doc_field(registered[name].doc, registered[name].default))
                 for name in key[1]]
        cls = dataclasses.make_dataclass(section.__name__, added, bases=(section,),
                                         namespace={"__extends__": section, "__module__": section.__module__})
        _EXTENDED[key] = cls
    return _EXTENDED[key]


def extension_value(section_value: Any, name: str) -> Any:
    """The value of a registered field in a section: as the config sets it, else the field's default."""
    if hasattr(section_value, name):
        return getattr(section_value, name)
    return extension_fields(type(section_value))[name].default


def with_extension_defaults(cfg: Any) -> dict:
    """A config as a dict with every registered field present, at its default where the config does not set it:
    how two configs compare whether or not each names a field at its default (a checkpoint saved when the field
    was the core's carries it, a recipe written since may not)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = with_extension_defaults(value)
        elif isinstance(value, list):
            out[f.name] = [with_extension_defaults(v) if dataclasses.is_dataclass(v) else v for v in value]
        else:
            out[f.name] = copy.deepcopy(value)
    for name, field in extension_fields(type(cfg)).items():
        out.setdefault(name, field.default)
    return out
