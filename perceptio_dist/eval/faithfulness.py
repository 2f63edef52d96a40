"""Does the answer use the depth chain? Interventions on the depth tokens, and the chain's own consistency.

A fine-tune with depth tokens can score well without reading them (an "ablate to validate" re-study of
AURORA-style models found exactly that for continuous perception tokens); only an intervention tells a
chain that is used from one that is decoration. For every relative-depth item whose answer carries a
depth block, the answer is generated again after the same prefix with the N codes replaced:

* ``own``           the model's own codes (the ordinary answer)
* ``ground_truth``  the VQ-VAE codes of the true depth (items with ground-truth depth: synthetic scenes)
* ``random``        codes drawn uniformly (seeded by the item's position, reproducible)
* ``constant``      code 0 at every cell
* ``other_image``   the model's own codes for the next item of the same group (another scene)

Accuracy under each is reported side by side. If answers use the chain, random and other-image codes
cost accuracy and ground-truth codes do not. *Chain consistency* is the share of answers whose letter is
the point the model's own decoded depth map puts nearest (largest normalised inverse depth at the
marker's centre, the map covering the whole image).
"""

from __future__ import annotations

import string

import numpy as np
import torch

from .benchmarks import EvalItem
from .generate import GenerationSettings, Prediction, SpatialPolicy, generate
from .predict import generation_inputs

INTERVENTIONS = ("own", "ground_truth", "random", "constant", "other_image")


def nearest_point(depth: np.ndarray, points: list[list[float]], image_size: tuple[int, int]) -> int:
    """Index of the point with the largest inverse depth (nearest), reading ``depth`` (D x D, the whole image
    resized) at each point's centre (x, y) in image pixels."""
    height, width = image_size
    side_y, side_x = depth.shape
    values = []
    for x, y in points:
        row = min(side_y - 1, max(0, int(y * side_y / height)))
        col = min(side_x - 1, max(0, int(x * side_x / width)))
        values.append(float(depth[row, col]))
    return int(np.argmax(values))


def chain_consistent(item: EvalItem, prediction: Prediction, letter: str | None) -> bool | None:
    """Whether the answer's letter is the point the answer's own depth map puts nearest (None: no map or points)."""
    if prediction.depth is None or not item.points:
        return None
    nearest = string.ascii_uppercase[nearest_point(prediction.depth, item.points, item.image.shape[:2])]
    return letter == nearest


def ground_truth_codes(model, item: EvalItem) -> list[int] | None:
    """The depth tokenizer's codes of the item's true depth (as preprocessing makes training targets)."""
    if item.gt_depth is None:
        return None
    from ..teachers.depth_anything import inverse_depth_target

    size = model.depth_vqvae.input_size
    target = torch.from_numpy(inverse_depth_target(item.gt_depth, size))[None, None]
    with torch.no_grad():
        weight = next(model.depth_vqvae.parameters())
        return model.depth_vqvae.encode(target.to(weight.device, weight.dtype))[0].tolist()


def intervention_codes(name: str, index: int, items: list[EvalItem], own: dict[int, list[int]],
                       ground_truth: dict[int, list[int]], num_codes: int, num_tokens: int,
                       seed: int = 0) -> list[int] | None:
    """The N codes intervention ``name`` puts into item ``index``'s answer, or None when it does not apply."""
    if index not in own:
        return None
    if name == "own":
        return own[index]
    if name == "ground_truth":
        return ground_truth.get(index)
    if name == "random":
        return np.random.default_rng([seed, index]).integers(0, num_codes, num_tokens).tolist()
    if name == "constant":
        return [0] * num_tokens
    if name == "other_image":
        group = [i for i, item in enumerate(items) if item.group == items[index].group and i in own]
        if len(group) < 2:
            return None
        return own[group[(group.index(index) + 1) % len(group)]]
    raise ValueError(f"unknown intervention {name!r}")


def chain_prefix(prediction: Prediction, codes: list[int], ids) -> list[int] | None:
    """The generated answer up to its depth block, with the block's codes replaced by ``codes``."""
    tokens = prediction.token_ids
    if ids.depth_start not in tokens:
        return None
    start = tokens.index(ids.depth_start)
    return tokens[:start + 1] + [ids.code_start + int(c) for c in codes] + [ids.depth_end]


def intervene(model, tokenizer, builder, items: list[EvalItem], batches: list[list[int]],
              own: dict[int, Prediction], settings: GenerationSettings,
              progress: bool) -> dict[str, dict[int, Prediction]]:
    """Per intervention (INTERVENTIONS but "own"), the answers generated after the same chain with other codes, for
    the relative-depth items of ``batches`` whose own answer has a depth block. Ranks take whole batches."""
    from tqdm import tqdm

    ids = model.token_ids
    own_codes = {i: p.depth_codes for i, p in own.items()
                 if items[i].task == "relative_depth" and p.depth_codes is not None}
    mine = [[i for i in chunk if i in own_codes] for chunk in batches]
    truth = {i: c for i in (j for chunk in mine for j in chunk) if (c := ground_truth_codes(model, items[i]))}
    text_only = SpatialPolicy(seg="forbid", depth="forbid")  # the chain is in the prompt now
    out: dict[str, dict[int, Prediction]] = {name: {} for name in INTERVENTIONS[1:]}
    with tqdm(total=sum(map(len, mine)) * len(out), desc="interventions", unit="answer",
              disable=not progress or not any(mine)) as bar:
        for chunk in mine:
            if not chunk:
                continue
            base = generation_inputs(tokenizer, builder, items, chunk)  # once per batch, for every intervention
            for name in out:
                chosen, codes_of, prompts = [], [], []
                for k, i in enumerate(chunk):
                    codes = intervention_codes(name, i, items, own_codes, truth, ids.num_codes, ids.num_depth_tokens)
                    prefix = None if codes is None else chain_prefix(own[i], codes, ids)
                    if prefix is not None:
                        chosen.append(k)
                        codes_of.append(codes)
                        prompts.append(torch.cat([base[0][k], torch.tensor(prefix, dtype=torch.long)]))
                if chosen:
                    pixels, sam, sizes = ([part[k] for k in chosen] for part in base[1:])
                    answers = generate(model, tokenizer, prompts, pixels, sam, sizes, text_only, settings)
                    for k, codes, prediction in zip(chosen, codes_of, answers):
                        prediction.depth_codes = codes
                        out[name][chunk[k]] = prediction
                bar.update(len(chunk))
    return out
