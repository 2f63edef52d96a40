"""perceptio-config and perceptio-model-info: a recipe resolved, documented, or counted."""

from __future__ import annotations

from ..config import ConfigError, dump_yaml, iter_field_docs
from . import config_error_exit, load_or_exit, recipe_parser


def model_info_main(argv: list[str] | None = None) -> None:
    """perceptio-model-info --recipe R: build the model on the meta device and print parameter counts."""
    parser = recipe_parser("perceptio-model-info", "Parameter counts of a recipe's model (meta device, no weights).")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.recipe, args.overrides)
    from ..model.perceptio import build_perceptio_meta, parameter_report

    try:
        report = parameter_report(build_perceptio_meta(cfg.model))
    except ConfigError as exc:
        config_error_exit(exc)
    for name, count in report.items():
        print(f"{name:30s} {count:>16,}  ({count / 1e9:.3f} B)")


def config_main(argv: list[str] | None = None) -> None:
    """perceptio-config --recipe R [--explain] [overrides]: print the resolved config or every field's documentation."""
    parser = recipe_parser("perceptio-config", "Show a resolved recipe, or document every config field.")
    parser.add_argument("--explain", action="store_true", help="list every field with its type, default and meaning")
    args = parser.parse_args(argv)
    if args.explain:
        for name, type_name, default, doc in iter_field_docs():
            print(f"{name} ({type_name}, default {default!r})\n    {doc}")
        return
    print(dump_yaml(load_or_exit(args.recipe, args.overrides)), end="")
