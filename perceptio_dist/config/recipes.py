"""Recipes: shipped YAML files or the user's, dotted overrides and overlay files, read into a typed config."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from .fields import ConfigError
from .paths import resolve_paths
from .typed_yaml import build_dataclass, normalise_numbers


def recipe_names(kind: str = "") -> list[str]:
    """Shipped recipes: training ones at the top of recipes/, others in a subfolder (e.g. 'preprocess')."""
    folder = resources.files("perceptio_dist.recipes").joinpath(kind) if kind else resources.files("perceptio_dist.recipes")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_recipe(recipe: str, kind: str = "") -> dict:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    elif recipe in recipe_names(kind):
        text = resources.files("perceptio_dist.recipes").joinpath(kind, f"{recipe}.yaml").read_text()
    else:
        raise ConfigError(
            f"Config error: recipe '{recipe}' is neither a shipped recipe ({', '.join(recipe_names(kind))}) "
            f"nor an existing .yaml file."
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config error: recipe '{recipe}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config error: recipe '{recipe}' must be a mapping at the top level.")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    if "=" not in override:
        raise ConfigError(f"Config error: override '{override}' must look like section.key=value (e.g. train.lr=1e-4).")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|\d+))*", key):
        raise ConfigError(f"Config error: '{key}' in override '{override}' is not a dotted key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):  # list items are addressed by index: sources.0.path=...
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Config error: override '{override}': '{where}' is not an item of a "
                                  f"{len(node)}-item list.")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"Config error: override '{override}': '{'.'.join(parts[:depth])}' is a value, not a "
                              "section.")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def is_overlay(override: str) -> bool:
    """An override argument that names a YAML file (no ``=``) is an overlay: a partial recipe merged over it."""
    return "=" not in override and override.endswith((".yaml", ".yml"))


def merge_overlay(data: dict, overlay: dict) -> None:
    """Deep-merge ``overlay`` into ``data`` in place: sections merge key by key, any other value replaces."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge_overlay(data[key], value)
        else:
            data[key] = value


def apply_overlay(data: dict, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"Config error: overlay '{path}' does not exist (an argument ending in .yaml is an overlay "
                          "file merged over the recipe).")
    try:
        overlay = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config error: overlay '{path}' is not valid YAML: {exc}") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"Config error: overlay '{path}' must be a mapping at the top level.")
    merge_overlay(data, overlay)


def load_typed_config(cls: type, recipe: str, overrides: Optional[list[str]] = None, kind: str = ""):
    """Read a recipe (shipped name or yaml path) into the dataclass ``cls``, type-checked. ``overrides`` are applied
    in order: ``section.key=value`` pairs, and overlay files (``path.yaml``, merged section by section)."""
    data = _read_recipe(recipe, kind)
    for override in overrides or []:
        if is_overlay(override):
            apply_overlay(data, override)
        else:
            apply_override(data, override)
    return resolve_paths(build_dataclass(cls, normalise_numbers(data), ""))
