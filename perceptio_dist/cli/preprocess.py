"""perceptio-preprocess: raw sources (or a teacher pass's shards) -> webdataset shards, as a Ray Data job.

Runs on a private local Ray, or on a cluster when RAY_ADDRESS is set, as under `ray job submit`:

    ray job submit --address http://HEAD:8265 -- perceptio-preprocess --recipe preprocess_8b_teacher
"""

from __future__ import annotations

import argparse
import logging

from ..config import ConfigError
from . import add_recipe_arguments, config_error_exit

DEFAULT_RECIPE = "preprocess_tiny"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="perceptio-preprocess",
        description="Raw sources -> webdataset shards + manifest (teacher depth, depth codes) with Ray Data. A "
                    "teacher pass (depth_codes: false) stores depth maps only; a code pass (from_shards) adds the "
                    "codes of a trained depth tokenizer to a teacher pass's shards.")
    add_recipe_arguments(parser, DEFAULT_RECIPE, kind="preprocess")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..preprocess.config import load_preprocess_config
    from ..preprocess.job import preprocess

    try:
        preprocess(load_preprocess_config(args.recipe, args.overrides))
    except ConfigError as exc:
        config_error_exit(exc)


if __name__ == "__main__":
    main()
