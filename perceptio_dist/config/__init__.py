"""The configuration engine: typed YAML recipes, dotted overrides and overlays, paths, and the generated reference.

It knows no component. Each component declares its own config beside its code (``model/config.py``,
``losses/config.py``, ``data/config.py``, ``train/config.py``, ``parallel/config.py``, ``preprocess/config.py``)
with :func:`doc_field` / :func:`path_field` and checks its own values; ``config/training.py`` assembles a training
run's config from them and ``config/rules.py`` holds the rules that join sections of different components.

Loading is strict: unknown keys, wrong types and inconsistent values raise :class:`ConfigError` with a
one-paragraph message that names the field, never a traceback.
"""

from .docs import dump_yaml, iter_extension_docs, iter_field_docs
from .fields import WEIGHTS_REMEDY, ConfigError, PathSpec, check_positive, config_error, doc_field, path_field
from .paths import check_input_paths, path_fields, resolve_paths, unset_variable
from .recipes import load_typed_config, recipe_names
from .typed_yaml import build_dataclass, normalise_numbers

__all__ = [
    "WEIGHTS_REMEDY", "ConfigError", "PathSpec", "build_dataclass", "check_input_paths", "check_positive",
    "config_error", "doc_field", "dump_yaml", "iter_extension_docs", "iter_field_docs", "load_typed_config", "normalise_numbers",
    "path_field", "path_fields", "recipe_names", "resolve_paths", "unset_variable",
]
