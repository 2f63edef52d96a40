"""Loader throughput (samples/s per DataLoader worker) and the rate one 8-GPU node needs for the 8B recipe.

    python tools/bench_loader.py [--scenes 32] [--batches 12] [--workers 0 1 2]

Builds its own shards in a temporary folder (640x480 pybullet scenes, the 8B recipe's depth tokenizer
geometry: 320 px maps, K=128, 10x10 codes, random tokenizer weights) and times the real ShardLoader
with two sample geometries: the tiny recipe's (64 px tiles, 128 px SAM input) and the 8B recipe's
(448 px tiles, up to 12 tiles + thumbnail, 1024 px SAM input). The in-process loader (0 workers) is
the baseline measured in the same run; ratios are against it.

The node requirement: per sample FLOPs of the 8B model (perceptio_dist/train/flops.py, PaLM-style,
from the meta-device model) for the tile count InternVL's tiling gives a 640x480 image at
max_tiles=12, plus 256 text/spatial tokens; 8 GPUs x 989 TFLOP/s (H100 bf16 dense) x 40% MFU divided
by that gives samples/s per node.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perceptio_dist.config import load_config  # noqa: E402
from perceptio_dist.data.conversation import ImageTokens  # noqa: E402
from perceptio_dist.data.loader import ShardLoader  # noqa: E402
from perceptio_dist.data.sample_builder import SampleBuilder, SampleGeometry  # noqa: E402
from perceptio_dist.preprocess.scenes.folders import write_scenes  # noqa: E402
from perceptio_dist.model.spatial_tokens import add_spatial_tokens  # noqa: E402
from perceptio_dist.model.tokenizer import load_tokenizer  # noqa: E402

H100_BF16_TFLOPS = 989.0
TEXT_AND_SPATIAL_TOKENS = 256


def build_shards(folder: Path, scenes: int) -> Path:
    write_scenes(folder / "scenes", scenes, width=640, height=480, progress=False)
    cmd = [sys.executable, "-m", "ray_jobs.preprocess", "--config", "preprocess_tiny",
           f"sources.0.path={folder / 'scenes'}", f"output_dir={folder / 'shards'}", "shard_size=16",
           "tokens.num_depth_codes=128", "tokens.depth_grid=10", "depth_vqvae.input_size=320",
           "depth_vqvae.code_dim=64", "depth_vqvae.base_channels=8", "depth_vqvae.max_channels=64"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return folder / "shards"


def geometries() -> dict[str, SampleGeometry]:
    return {
        "tiny": SampleGeometry(tile_size=64, max_tiles=1, image_tokens_per_tile=16, sam_size=128, depth_size=320,
                               num_depth_tokens=100, num_codes=128),
        "8b": SampleGeometry(tile_size=448, max_tiles=12, image_tokens_per_tile=256, sam_size=1024, depth_size=320,
                             num_depth_tokens=100, num_codes=128),
    }


def measure(shards: Path, geometry: SampleGeometry, workers: int, batches: int, batch_size: int = 4) -> float:
    cfg = load_config("tiny_cpu", ["model.tokens.num_depth_codes=128", "model.tokens.depth_grid=10",
                                   "model.depth_vqvae.input_size=320"])
    tokenizer = load_tokenizer(cfg.model.backbone)
    ids = add_spatial_tokens(tokenizer, cfg.model.tokens)
    builder = SampleBuilder(tokenizer, ids, ImageTokens("<img>", "<IMG_CONTEXT>", "</img>",
                                                        geometry.image_tokens_per_tile), geometry, max_seq_len=10**6)
    loader = ShardLoader(shards, cfg.data.task_weights, seed=0, rank=0, world_size=1, grad_accum=1,
                         micro_batch_size=batch_size, builder=builder, num_workers=workers,
                         pad_token_id=tokenizer.pad_token_id)
    it = iter(loader)
    for _ in range(max(2, workers)):  # warm-up: worker start, first shard reads
        next(it)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += next(it).num_samples
    return samples / (time.perf_counter() - start)


def node_requirement() -> dict:
    from perceptio_dist.model.perceptio import build_perceptio_meta
    from perceptio_dist.train.flops import flops_model_for
    from transformers import GotOcr2ImageProcessorPil

    fm = flops_model_for(build_perceptio_meta(load_config("perceptio_8b").model))
    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                         max_patches=12)
    tiles = int(processor(images=[np.zeros((480, 640, 3), np.uint8)], return_tensors="pt")["num_patches"][0])
    seq = tiles * 256 + TEXT_AND_SPATIAL_TOKENS
    per_sample = fm.step_flops([seq], tiles)
    per_node = 8 * H100_BF16_TFLOPS * 1e12 * 0.40 / per_sample
    return {"tiles_per_640x480_image": tiles, "tokens_per_sample": seq, "tflops_per_sample": per_sample / 1e12,
            "samples_per_s_per_node_at_40pct_mfu": per_node}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(Path(tmp), args.scenes)
        for name, geometry in geometries().items():
            rates = {w: measure(shards, geometry, w, args.batches) for w in args.workers}
            base = rates[args.workers[0]]
            results[name] = {f"workers={w}": {"samples_per_s": round(r, 2),
                                              "per_worker": round(r / max(1, w), 2),
                                              "ratio_vs_baseline": round(r / base, 2)} for w, r in rates.items()}
    need = node_requirement()
    best_8b = max(v["per_worker"] for v in results["8b"].values())
    need["dataloader_workers_per_node_at_measured_rate"] = round(need["samples_per_s_per_node_at_40pct_mfu"]
                                                                 / best_8b, 1)
    print(json.dumps({"loader": results, "8b_node_requirement": need}, indent=2))


if __name__ == "__main__":
    main()
