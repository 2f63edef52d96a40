"""How a config field is declared (documented, possibly a path) and the one error a user mistake raises."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A user mistake in a recipe or an override. The message is meant to be read as is."""


def doc_field(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, **metadata):
    """A dataclass field with its documentation (``metadata["doc"]``), the one way config fields are declared."""
    kwargs = {"metadata": {"doc": text, **metadata}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return field(**kwargs)


@dataclass(frozen=True)
class PathSpec:
    """What a path field holds, read by :func:`resolve_paths` (at load) and :func:`check_input_paths` (at start).

    ``input`` paths are expanded ($VARS, ~) and resolved against the working directory, then the repository
    root; ``output`` paths are expanded only. ``keywords`` and ``prefixes`` mark values that are not paths
    ('auto', 'pretrained', 'builtin:...'). ``must_exist``: refused at start when missing, with ``purpose``
    (what the file is) and ``remedy`` (what to do) in the message.
    """

    kind: Literal["input", "output"] = "input"
    purpose: str = ""
    remedy: str = ""
    keywords: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    must_exist: bool = True
    folder: bool = False

    def is_path(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value) and value not in self.keywords and not value.startswith(
            self.prefixes)


WEIGHTS_REMEDY = "Point it at a local copy (no weights are downloaded) or set it to null to use random weights."


def path_field(text: str, default: Any = dataclasses.MISSING, **spec):
    """A documented field holding a path; ``spec`` are :class:`PathSpec` fields."""
    return doc_field(text, default, path=PathSpec(**spec))


def config_error(where: str, message: str) -> ConfigError:
    """The error for a wrong value at the dotted field ``where``: one paragraph that names the field."""
    return ConfigError(f"Config error at '{where}': {message}")


def check_positive(values: dict[str, float]) -> None:
    """Refuse the first of ``{dotted name: value}`` that is not positive."""
    for where, value in values.items():
        if value <= 0:
            raise config_error(where, f"must be positive, got {value}.")
