"""How often a relative-depth question can be answered without depth: each shortcut (always the lowest / highest /
leftmost / rightmost marker, the marker on the largest region, the most frequent answer letter) against chance,
on questions made by the real generator (preprocess/scenes/tasks.scene_records) from rendered scenes.

    python tools/toy/shortcuts.py --scenes runs/toy_data/heldout_scenes --questions-per-scene 20

The question rules are the toy preprocessing recipe's synthetic source (--recipe) with its marker sets per scene
overridden. 200 evaluation items are too few to tell a shortcut from chance: measure thousands. A shortcut far
*under* chance is one too (it rules a marker out).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from perceptio_dist.preprocess.config import load_preprocess_config
from perceptio_dist.preprocess.scenes.render import load_scene_meta
from perceptio_dist.preprocess.scenes.tasks import LETTERS, scene_records

# The answers a question can be read from without depth: each picks one marker from positions and regions alone
# (``points`` [[x, y], ...] in pixels, ``sizes`` the size of the region under each marker).
SHORTCUTS = {
    "lowest": lambda points, sizes: int(np.argmax([y for _, y in points])),
    "highest": lambda points, sizes: int(np.argmin([y for _, y in points])),
    "leftmost": lambda points, sizes: int(np.argmin([x for x, _ in points])),
    "rightmost": lambda points, sizes: int(np.argmax([x for x, _ in points])),
    "largest_region": lambda points, sizes: int(np.argmax(sizes)),
}


def region_sizes(instances: np.ndarray) -> np.ndarray:
    """Per pixel, the pixel count of the region it belongs to (an object, or the background as one region)."""
    _, inverse, counts = np.unique(instances, return_inverse=True, return_counts=True)
    return counts[inverse].reshape(instances.shape)


def measure(scene_folders: list[Path], source) -> dict:
    """Per shortcut the share of questions it answers right, beside chance; the questions made and given up."""
    rules = source.question_rules()
    hits: Counter = Counter()
    letters: Counter = Counter()
    chance, made = [], 0
    for folder in scene_folders:
        depth = np.load(folder / "depth.npy", allow_pickle=False)
        sizes = region_sizes(np.asarray(Image.open(folder / "instances.png")))
        for record in scene_records(folder, load_scene_meta(folder), depth, ["relative_depth"], rules):
            closest = LETTERS.index(re.findall(r"\(([A-E])\)", record.turns[0][1])[-1])
            under = [int(sizes[int(y), int(x)]) for x, y in record.points]
            for name, pick in SHORTCUTS.items():
                hits[name] += pick(record.points, under) == closest
            letters[closest] += 1
            chance.append(1 / len(record.points))
            made += 1
    out = {name: hits[name] / made for name in SHORTCUTS}
    out["most_frequent_letter"] = letters.most_common(1)[0][1] / made
    out.update(chance=float(np.mean(chance)), questions=made,
               asked=len(scene_folders) * rules.per_scene)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", required=True, help="a folder of rendered scenes (perceptio-scenes)")
    parser.add_argument("--recipe", default="preprocess_toy", help="the preprocessing recipe whose rules to use")
    parser.add_argument("--questions-per-scene", type=int, default=20)
    args = parser.parse_args()
    source = dataclasses.replace(load_preprocess_config(args.recipe).sources[0],
                                 questions_per_scene=args.questions_per_scene)
    folders = sorted(p for p in Path(args.scenes).iterdir() if (p / "meta.json").exists())
    result = measure(folders, source)
    print(f"{result['questions']} questions of {result['asked']} asked, from {len(folders)} scenes; "
          f"chance {100 * result['chance']:.1f} %")
    for name in (*SHORTCUTS, "most_frequent_letter"):
        print(f"{name:22s} {100 * result[name]:5.1f} %  ({100 * (result[name] - result['chance']):+.1f} over chance)")


if __name__ == "__main__":
    main()
