"""Paths in configs: $VARS and ~ expanded and input paths resolved once, at load; existence checked at start with a
message that says what the path is for. The one module that expands or resolves paths."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional

from .fields import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def _expand(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def _resolve_input(value: str) -> str:
    """Relative to the working directory when it exists there, else to the repository root when it exists there."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return value
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else value


def path_fields(obj: Any, prefix: str = ""):
    """(owner, field name, dotted name, PathSpec) for every path field of a config tree, lists of sections included."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if "path" in f.metadata:
            yield obj, f.name, name, f.metadata["path"]
        elif dataclasses.is_dataclass(value):
            yield from path_fields(value, name + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from path_fields(item, f"{name}[{i}].")


def resolve_paths(cfg: Any) -> Any:
    """Expand $VARS and ~ in every path field and resolve input paths (working directory, then repository root).

    Done once, when a config is loaded: code below ``config`` receives paths it can open as they are. A path
    whose variable is not set stays as written; :func:`check_input_paths` refuses it with the variable's name.
    """
    for owner, name, _, spec in path_fields(cfg):
        value = getattr(owner, name)
        if not spec.is_path(value):
            continue
        expanded = _expand(value)
        if _VARIABLE.search(expanded):
            continue
        setattr(owner, name, _resolve_input(expanded) if spec.kind == "input" else expanded)
    return cfg


def unset_variable(value: str) -> Optional[str]:
    """The first environment variable a (resolved) path still names, i.e. one that was not set at load."""
    match = _VARIABLE.search(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def check_input_paths(cfg: Any, skip: tuple[str, ...] = (), first: tuple[str, ...] = ()) -> None:
    """Every input path the config needs exists (and is a folder where one is expected), else a message that says
    what the path is for and what to do. Output paths with an unset variable are refused too. Fields in ``first``
    are checked before the others (the data before the weights: without data nothing else matters)."""
    fields = sorted(path_fields(cfg), key=lambda item: item[2] not in first)
    for owner, name, dotted, spec in fields:
        value = getattr(owner, name)
        if dotted in skip or not spec.is_path(value):
            continue
        variable = unset_variable(value)
        if variable:
            raise ConfigError(
                f"Config error at '{dotted}': '{value}' uses the environment variable ${variable}, which is not set. "
                f"Export it or override the field, e.g. {dotted}=/path/to/it.")
        if spec.kind != "input" or not spec.must_exist:
            continue
        what = f" It should be {spec.purpose}." if spec.purpose else ""
        if not Path(value).exists():
            raise ConfigError(f"Config error at '{dotted}': '{value}' does not exist.{what} {spec.remedy}".rstrip())
        if spec.folder and not Path(value).is_dir():
            raise ConfigError(f"Config error at '{dotted}': '{value}' is a file, not a folder.{what}")
