"""Scene folders: render N synthetic scenes into a folder, one folder each (perceptio-scenes, cli/scenes.py).

Scenes already complete (their meta.json exists) are kept, so an interrupted run resumes.
"""

from __future__ import annotations

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
