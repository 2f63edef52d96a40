"""``perceptio-scenes --out DIR --num N [--seed S]``: render N synthetic scenes into DIR (one folder each).

Scenes already complete (their meta.json exists) are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from .render import render_scene, write_scene


def scene_folder(out: Path, seed: int) -> Path:
    return out / f"scene_{seed:08d}"


def write_scenes(out: Path, num: int, seed: int = 0, width: int = 320, height: int = 240,
                 progress: bool = True) -> list[Path]:
    folders = []
    for s in tqdm(range(seed, seed + num), desc="render scenes", unit="scene", disable=not progress):
        folder = scene_folder(out, s)
        if not (folder / "meta.json").exists():
            write_scene(render_scene(s, width, height), folder)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="perceptio-scenes", description=__doc__.splitlines()[0])
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
