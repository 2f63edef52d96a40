"""``perceptio-scenes --out DIR --num N [--seed S]``: render N synthetic scenes into DIR (one folder each).

Scenes already complete (their meta.json exists) are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..preprocess.scenes.folders import write_scenes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceptio-scenes", description="Render N synthetic scenes into a folder (one folder each).")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num", required=True, type=int, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first scene (scene i uses seed + i)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args(argv)
    if args.num <= 0 or args.width < 32 or args.height < 32:
        parser.error("--num must be positive and the image at least 32x32")
    folders = write_scenes(args.out, args.num, args.seed, args.width, args.height)
    print(f"{len(folders)} scenes in {args.out}")


if __name__ == "__main__":
    main()
