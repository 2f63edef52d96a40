"""Every console entry point of perceptio_dist, one module per command; the library code they call lives in
the packages below. A config mistake prints one paragraph and exits with status 2, never a traceback.

    perceptio-train       cli/train.py     (also `python -m perceptio_dist.train`, which torchrun runs per rank)
    perceptio-config      cli/config.py    resolved recipe, or every field documented (--explain)
    perceptio-model-info  cli/config.py    parameter counts on the meta device
    perceptio-plan        cli/plan.py      per-GPU memory and step time by parallel layout
    perceptio-scenes      cli/scenes.py    render synthetic scenes
    perceptio-preprocess  cli/preprocess.py  sources -> shards with Ray Data (also `python -m ray_jobs.preprocess`)
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

from ..config import ConfigError, recipe_names
from ..config.training import PerceptioConfig, load_config

CONFIG_ERROR_EXIT = 2


OVERRIDES_HELP = ("dotted overrides, e.g. train.lr=1e-4 train.max_steps=10, and overlay files (an argument ending in "
                  ".yaml: a partial recipe merged over it), applied in order")


def add_recipe_arguments(parser: argparse.ArgumentParser, default: str, kind: str = "") -> None:
    """The one spelling of the recipe flag across commands: --recipe (--config is kept as an alias)."""
    parser.add_argument("--recipe", "--config", dest="recipe", default=default,
                        help=f"a shipped recipe ({', '.join(recipe_names(kind))}) or a path to a YAML file "
                             f"(default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)


def recipe_parser(prog: str, description: str, default: str = "tiny_cpu") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_recipe_arguments(parser, default)
    return parser


def load_or_exit(recipe: str, overrides: list[str]) -> PerceptioConfig:
    try:
        return load_config(recipe, overrides)
    except ConfigError as exc:
        config_error_exit(exc)


# Set by the launcher (cli/train.py): a folder where ranks note the errors already printed, so that an error
# several ranks find (the same damaged shard) is printed once.
PRINTED_ERRORS_VARIABLE = "PERCEPTIO_PRINTED_ERRORS"


def config_error_exit(exc: ConfigError) -> None:
    # Under torchrun every rank fails the same way; one message is enough. A data error is printed where it was
    # found (any rank), once per launch.
    found_here = getattr(exc, "every_rank", False)
    # RANK under torchrun; before it (the launcher, one per node under srun) SLURM's task number.
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if _first_to_print(str(exc)) if found_here else rank == "0":
        print(str(exc), file=sys.stderr)
    raise SystemExit(CONFIG_ERROR_EXIT)


def _first_to_print(message: str) -> bool:
    import hashlib

    folder = os.environ.get(PRINTED_ERRORS_VARIABLE)
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, hashlib.sha256(message.encode()).hexdigest()[:16]),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True
