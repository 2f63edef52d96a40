"""Does the depth block come from the image or from its own earlier codes? Teacher-forced depth-token loss of
an exported model with each sample's own image, and with another sample's image in its place.

    python tools/toy/depth_image_dependence.py --model runs/toy/depth_model/export --shards runs/toy_data/shards \
        [--shards runs/toy_data/heldout_shards] [--batches 12] [--batch-size 8]

The shards are read in the training loader's order (tasks depth and relative_depth, seed 123); the other
image is the next sample's in the batch (images rolled by one sample). Prints per shard folder the mean
depth-token cross-entropy (nats per code) both ways, and their difference: near 0 means the block is predicted
from the previous codes alone (the autoregressive shortcut), whatever the image. Compare with ln K (uniform)
and with the per-position marginal entropy of the codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perceptio_dist.data.loader import ShardLoader  # noqa: E402
from perceptio_dist.data.training_data import build_sample_builder  # noqa: E402
from perceptio_dist.export import exported_config, load_exported  # noqa: E402
from perceptio_dist.losses.lm_head_module import LMHeadTermsModule  # noqa: E402
from perceptio_dist.losses.objective import TERMS, PerceptioObjective, objective_outputs  # noqa: E402


def token_loss(model, objective, lm_head, batch, pixel_values) -> float:
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, pixel_values, batch.sam_images)
        _, terms, _ = objective_outputs(objective, lm_head, out.hidden_states, model.lm_head.weight,
                                        model.depth_vqvae.soft_decode, out.mask_logits, out.num_seg, batch.labels,
                                        batch.seg_masks, batch.teacher_depth, batch.has_teacher_depth)
    return float(terms[TERMS.index("token")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an export folder (perceptio-export)")
    parser.add_argument("--shards", required=True, action="append", help="shard folder(s) to read")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    cfg = exported_config(args.model)
    model, tokenizer = load_exported(args.model)
    objective = PerceptioObjective(cfg.objective, model.token_ids)
    lm_head = LMHeadTermsModule.from_config(cfg.objective, torch.device("cpu"))
    builder = build_sample_builder(cfg, tokenizer, model.token_ids)
    results = {}
    for folder in args.shards:
        loader = ShardLoader(folder, {"depth": 1.0, "relative_depth": 1.0}, 123, 0, 1, 1, args.batch_size, builder,
                             0, tokenizer.pad_token_id)
        own, other = [], []
        for _, batch in zip(range(args.batches), loader):
            tiles = batch.pixel_values.shape[0] // batch.num_samples
            if tiles * batch.num_samples != batch.pixel_values.shape[0]:
                sys.exit("samples with different tile counts: this check needs one tile count per sample")
            own.append(token_loss(model, objective, lm_head, batch, batch.pixel_values))
            other.append(token_loss(model, objective, lm_head, batch, torch.roll(batch.pixel_values, tiles, 0)))
        results[folder] = {"own_image": round(float(np.mean(own)), 4), "other_image": round(float(np.mean(other)), 4),
                           "difference": round(float(np.mean(other) - np.mean(own)), 4),
                           "uniform": round(float(np.log(model.token_ids.num_codes)), 4)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
