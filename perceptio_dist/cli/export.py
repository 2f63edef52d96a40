"""perceptio-export: a training checkpoint as an inference folder."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from . import config_error_exit


def main(argv: list[str] | None = None) -> None:
    """perceptio-export --checkpoint DIR --out DIR: a checkpoint as an inference folder (safetensors, tokenizer, config)."""
    parser = argparse.ArgumentParser(prog="perceptio-export", description="Export a training checkpoint for inference.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (runs/x/checkpoints/global_step00000040), or a run's checkpoints "
                             "folder for its newest complete checkpoint")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--adapter", action="store_true",
                        help="LoRA runs: also write the adapter in peft's format to <out>/adapter (the merged weights "
                             "are written either way)")
    args = parser.parse_args(argv)
    from ..export import export_checkpoint

    try:
        print(export_checkpoint(args.checkpoint, args.out, adapter=args.adapter))
    except ConfigError as exc:
        config_error_exit(exc)


if __name__ == "__main__":
    main()
