"""How well does a depth tokenizer's code say the nearness level the scan step writes for a marker? (issue 16)

    python tools/toy/code_levels.py --shards runs/toy_data/shards --scenes runs/toy_data/scenes \
        --tokenizer runs/toy_data/depth_vqvae

For every marker of the shards' relative-depth questions it takes the level the answer's scan writes (the true
depth's cell mean, preprocess/scenes/tasks.marker_readout) and the tokenizer's code of that cell (the scene's true
depth encoded as preprocessing does), and prints:

* the best any code -> level table can do (each code mapped to its most frequent level): the ceiling of an answer
  that reads a marker's level from its own cell's code alone;
* how often the level of the decoded map's cell mean is the true level (what reading the whole block can give);
* how often the decoded map's levels single out the question's true nearest marker, and how often they tie.

Results and what they decided: README, the toy world, eighth round.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from perceptio_dist.data.shards import npy_load, read_shard
from perceptio_dist.experiments.toy.marker_step import marker_readout, nearness_level
from perceptio_dist.preprocess.scenes.tasks import cell_means
from perceptio_dist.teachers.depth_anything import inverse_depth_target


def best_lookup_accuracy(pairs: list[tuple[int, int]]) -> float:
    """Share of (code, level) pairs a code -> level table gets right when each code maps to its most frequent level."""
    by_code: dict[int, Counter] = defaultdict(Counter)
    for code, level in pairs:
        by_code[code][level] += 1
    return sum(max(c.values()) for c in by_code.values()) / max(1, len(pairs))


def measure(shards: Path, scenes: Path, tokenizer: Path) -> dict:
    from perceptio_dist.train.vqvae_trainer import load_tokenizer

    model, meta = load_tokenizer(tokenizer)
    grid = meta["grid"]
    pairs, decoded_right, single, ties, questions = [], 0, 0, 0, 0
    per_scene: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # several question sets share a scene
    for tar in sorted((shards / "relative_depth").glob("*.tar")):
        for sample in read_shard(tar):
            scene = sample.info["meta"]["scene"]
            if scene not in per_scene:
                depth = np.load(scenes / scene / "depth.npy")
                target = torch.from_numpy(inverse_depth_target(depth, model.input_size))[None, None]
                with torch.no_grad():
                    codes = model.encode(target)
                    decoded = model.decode(codes)[0, 0].numpy()
                per_scene[scene] = depth, codes[0].numpy().reshape(grid, grid), cell_means(decoded, grid)
            depth, codes, decoded_means = per_scene[scene]
            readout = marker_readout(depth, sample.info["points"], grid)
            decoded_levels = [nearness_level(decoded_means[r, c]) for r, c, _ in readout]
            for (r, c, level), decoded in zip(readout, decoded_levels):
                pairs.append((int(codes[r, c]), level))
                decoded_right += decoded == level
            nearest = int(np.argmax([level for _, _, level in readout]))
            if decoded_levels.count(max(decoded_levels)) > 1:
                ties += 1
            else:
                single += int(np.argmax(decoded_levels)) == nearest
            questions += 1
    if not pairs:
        sys.exit(f"no relative-depth questions under {shards / 'relative_depth'}")
    return {"tokenizer": str(tokenizer), "decoder": meta["depth_vqvae"].get("decoder", "conv"),
            "num_codes": meta["num_codes"], "markers": len(pairs), "questions": questions,
            "codes_used": len({code for code, _ in pairs}),
            "level_from_own_code": best_lookup_accuracy(pairs), "decoded_level_right": decoded_right / len(pairs),
            "decoded_single_out_nearest": single / questions, "decoded_ties": ties / questions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="a preprocessed shard folder (relative_depth/)")
    parser.add_argument("--scenes", type=Path, required=True, help="the scene folders the shards were made from")
    parser.add_argument("--tokenizer", type=Path, nargs="+", required=True, help="trained tokenizer folders")
    args = parser.parse_args()
    for folder in args.tokenizer:
        if not (folder / "tokenizer.json").exists():
            sys.exit(f"{folder} is not a trained tokenizer folder (no tokenizer.json)")
        print(json.dumps(measure(args.shards, args.scenes, folder)), flush=True)


if __name__ == "__main__":
    main()
