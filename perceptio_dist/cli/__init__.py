"""Every console entry point of perceptio_dist, one module per command; the library code they call lives in
the packages below. A config mistake prints one paragraph and exits with status 2, never a traceback.

    perceptio-train       cli/train.py     (also `python -m perceptio_dist.train`, which torchrun runs per rank)
    perceptio-config      cli/config.py    resolved recipe, or every field documented (--explain)
    perceptio-model-info  cli/config.py    parameter counts on the meta device
    perceptio-plan        cli/plan.py      per-GPU memory and step time by parallel layout
    perceptio-scenes      cli/scenes.py    render synthetic scenes
    perceptio-vqvae       cli/vqvae.py     train / evaluate / ablate the depth tokenizer
    perceptio-export      cli/export.py    checkpoint -> inference folder
    perceptio-eval        cli/eval.py      benchmarks (`torchrun ... -m perceptio_dist.cli.eval` over ranks)
    perceptio-demo        cli/demo.py      the main job (./run_demo.sh)
    perceptio-sweep       cli/sweep.py     train a list of configurations briefly, one table
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError, PerceptioConfig, load_config, recipe_names

CONFIG_ERROR_EXIT = 2


def recipe_parser(prog: str, description: str, default: str = "tiny_cpu") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--recipe", default=default,
                        help=f"a shipped recipe ({', '.join(recipe_names())}) or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. train.lr=1e-4 train.max_steps=10")
    return parser


def load_or_exit(recipe: str, overrides: list[str]) -> PerceptioConfig:
    try:
        return load_config(recipe, overrides)
    except ConfigError as exc:
        config_error_exit(exc)


def config_error_exit(exc: ConfigError) -> None:
    # Under torchrun every rank fails the same way; one message is enough.
    if os.environ.get("RANK", "0") == "0" or getattr(exc, "every_rank", False):  # a data error: where it was found
        print(str(exc), file=sys.stderr)
    raise SystemExit(CONFIG_ERROR_EXIT)
