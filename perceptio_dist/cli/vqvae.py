"""perceptio-vqvae train|eval|ablate: the depth tokenizer (``torchrun ... -m perceptio_dist.cli.vqvae train`` for DDP)."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from . import add_recipe_arguments, config_error_exit


def main(argv: list[str] | None = None) -> None:
    """perceptio-vqvae train|eval|ablate: the depth tokenizer (train it, report its quality, compare K and grids)."""
    parser = argparse.ArgumentParser(prog="perceptio-vqvae", description="Train and evaluate the depth tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer (run under torchrun for several ranks)")
    add_recipe_arguments(train, "vqvae_tiny", kind="vqvae")
    evaluate = sub.add_parser("eval", help="report reconstruction quality on real RGB-D frames")
    evaluate.add_argument("--tokenizer", required=True, help="folder with tokenizer.safetensors + tokenizer.json")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.add_argument("--rgbd", default=None, help="folder of the shared RGB-D frames (default ../shared/data/rgbd)")
    evaluate.add_argument("--sets", type=int, default=500, help="point sets per size and frame")
    ablate = sub.add_parser("ablate", help="train variants of a recipe (K, grid) and report them side by side")
    ablate.add_argument("--codes", type=int, nargs="+", default=[64, 128, 256])
    ablate.add_argument("--grids", type=int, nargs="+", default=[8, 10, 16])
    ablate.add_argument("--out", required=True)
    ablate.add_argument("--sets", type=int, default=500)
    add_recipe_arguments(ablate, "vqvae_report", kind="vqvae")
    args = parser.parse_args(argv)
    from ..depth_tokenizer import ablate_tokenizers, evaluate_tokenizer, train_tokenizer

    try:
        if args.command == "train":
            train_tokenizer(args.recipe, args.overrides)
        elif args.command == "eval":
            print(evaluate_tokenizer(args.tokenizer, args.out, args.rgbd, args.sets))
        else:
            print(ablate_tokenizers(args.recipe, args.overrides, args.codes, args.grids, args.out, args.sets))
    except ConfigError as exc:
        config_error_exit(exc)


if __name__ == "__main__":
    main()
