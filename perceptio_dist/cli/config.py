"""perceptio-config and perceptio-model-info: a recipe resolved, documented, or counted."""

from __future__ import annotations

import os
import sys

from ..config import ConfigError, dump_yaml, iter_extension_docs, iter_field_docs
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
    parser.add_argument("--kind", choices=sorted(CONFIG_KINDS), default="train",
                        help="which recipes: training (default), preprocessing or depth-tokenizer training; the "
                             "recipe then defaults to preprocess_tiny or vqvae_tiny")
    args = parser.parse_args(argv)
    cls, load, default = CONFIG_KINDS[args.kind]()
    recipe = default if args.recipe == parser.get_default("recipe") else args.recipe
    try:
        if args.explain:
            for name, type_name, default, doc in [*iter_field_docs(cls), *iter_extension_docs(cls)]:
                print(f"{name} ({type_name}, default {default!r})\n    {doc}")
        else:
            try:
                text = dump_yaml(load(recipe, args.overrides))
            except ConfigError as exc:
                config_error_exit(exc)
            print(text, end="")
        sys.stdout.flush()
    except BrokenPipeError:  # `perceptio-config --explain | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        raise SystemExit(0)


def _train_kind():
    from ..config.training import PerceptioConfig, load_config

    return PerceptioConfig, load_config, "tiny_cpu"


def _preprocess_kind():
    from ..preprocess.config import PreprocessConfig, load_preprocess_config

    return PreprocessConfig, load_preprocess_config, "preprocess_tiny"


def _vqvae_kind():
    from ..train.vqvae_config import VQVAETrainConfig, load_vqvae_config

    return VQVAETrainConfig, load_vqvae_config, "vqvae_tiny"


CONFIG_KINDS = {"train": _train_kind, "preprocess": _preprocess_kind, "vqvae": _vqvae_kind}
