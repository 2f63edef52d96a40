"""Loader throughput (samples/s per DataLoader worker) and the rate one 8-GPU node needs for the 8B recipe.

    python tools/bench_loader.py [--scenes 32] [--batches 12] [--workers 0 1 2]

Builds its own shards in a temporary folder (640x480 pybullet scenes, the 8B recipe's depth tokenizer
geometry: 320 px maps, K=128, 10x10 codes, random tokenizer weights) and times the real ShardLoader
with two sample geometries: the tiny recipe's (64 px tiles, 128 px SAM input) and the 8B recipe's
(448 px tiles, up to 12 tiles + thumbnail, 1024 px SAM input). The in-process loader (0 workers) is
the baseline measured in the same run; ratios are against it.

Sample access, before and after (``--access``): raw sample reads in the order the loader's sampler gives for
a global batch of 16 slots, each mode in a fresh process (peak memory of the reads themselves through
tracemalloc, and the process's peak RSS, which the imports dominate): whole shards in an LRU
of 4 (the loader before the indexed reader) against one sample at a time through the tar index
(data/shard_access.py). The whole-shard reader is the baseline; ratios are against it.

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

from perceptio_dist.config.training import load_config  # noqa: E402
from perceptio_dist.data.conversation import ImageTokens  # noqa: E402
from perceptio_dist.data.loader import ShardLoader  # noqa: E402
from perceptio_dist.data.sample_builder import SampleBuilder, SampleGeometry  # noqa: E402
from perceptio_dist.preprocess.scenes.folders import write_scenes  # noqa: E402
from perceptio_dist.model.spatial_tokens import add_spatial_tokens  # noqa: E402
from perceptio_dist.model.tokenizer import load_tokenizer  # noqa: E402

H100_BF16_TFLOPS = 989.0
TEXT_AND_SPATIAL_TOKENS = 256


def build_shards(folder: Path, scenes: int, shard_size: int = 16) -> Path:
    write_scenes(folder / "scenes", scenes, width=640, height=480, progress=False)
    cmd = [sys.executable, "-m", "ray_jobs.preprocess", "--config", "preprocess_tiny",
           f"sources.0.path={folder / 'scenes'}", f"output_dir={folder / 'shards'}", f"shard_size={shard_size}",
           "tokens.num_depth_codes=128", "tokens.depth_grid=10", "depth_vqvae.input_size=320",
           "depth_vqvae.code_dim=64", "depth_vqvae.base_channels=8", "depth_vqvae.max_channels=64",
           "depth_vqvae.checkpoint=null"]  # a random tokenizer: its weights do not change the timing
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


def access_order(shards: Path, reads: int) -> list[tuple[dict, int]]:
    from perceptio_dist.data.sampling import GlobalSampler
    from perceptio_dist.data.shards import read_manifest

    entries: dict[str, list[dict]] = {}
    for entry in read_manifest(shards)["shards"]:
        entries.setdefault(entry["task"], []).append(entry)
    tasks = sorted(entries)
    sampler = GlobalSampler(tasks, np.full(len(tasks), 1 / len(tasks)), {t: [e["num_samples"] for e in entries[t]]
                                                                         for t in tasks}, 0, 16, 4)
    refs = [sampler.draw(step, slot) for step in range(reads // 16 + 1) for slot in range(16)][:reads]
    return [(entries[r.task][r.shard], r.index) for r in refs]


def access_worker(shards: Path, mode: str, reads: int) -> dict:
    """Raw reads in sampler order (this process only): samples/s and peak RSS."""
    import resource
    import tracemalloc
    from collections import OrderedDict

    from perceptio_dist.data.shard_access import OpenShards, ShardStore
    from perceptio_dist.data.shards import read_shard

    order = access_order(shards, reads)
    whole: OrderedDict = OrderedDict()
    indexed = OpenShards(ShardStore(shards), max_open=36)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()  # the reads' own allocations (sample bytes, indexes, cached shards), not the imports
    start, nbytes = time.perf_counter(), 0
    for entry, index in order:
        if mode == "whole_shards":
            path = shards / entry["path"]
            if path not in whole:
                whole[path] = list(read_shard(path))
                if len(whole) > 4:
                    whole.popitem(last=False)
            whole.move_to_end(path)
            sample = whole[path][index]
        else:
            sample = indexed.sample(entry, index)
        nbytes += len(sample.image) + len(sample.depth_npy)
    seconds = time.perf_counter() - start
    peak_heap = tracemalloc.get_traced_memory()[1]
    return {"samples_per_s": round(len(order) / seconds, 1),
            "peak_reader_memory_mb": round(peak_heap / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
            "mb_per_sample": round(nbytes / len(order) / 2**20, 3)}


def access_comparison(shards: Path, reads: int) -> dict:
    out = {}
    for mode in ("whole_shards", "indexed"):
        proc = subprocess.run([sys.executable, __file__, "--access-worker", mode, "--shards", str(shards),
                               "--reads", str(reads)], check=True, capture_output=True, text=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["whole_shards"]
    for r in out.values():
        r["speed_ratio_vs_whole_shards"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
        r["memory_ratio_vs_whole_shards"] = round(r["peak_reader_memory_mb"] / base["peak_reader_memory_mb"], 3)
    return out


def node_requirement() -> dict:
    from perceptio_dist.model.perceptio import build_perceptio_meta
    from perceptio_dist.train.flops import flops_model_for
    from transformers import GotOcr2ImageProcessorPil

    fm = flops_model_for(build_perceptio_meta(load_config("perceptio_8b").model))
    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                         max_patches=12)
    tiles = int(processor(images=[np.zeros((480, 640, 3), np.uint8)], return_tensors="pt")["num_patches"][0])
    seq = tiles * 256 + TEXT_AND_SPATIAL_TOKENS
    per_sample = fm.step_flops([seq], tiles, target_rows=TEXT_AND_SPATIAL_TOKENS)  # the LM head: at most these rows
    per_node = 8 * H100_BF16_TFLOPS * 1e12 * 0.40 / per_sample
    return {"tiles_per_640x480_image": tiles, "tokens_per_sample": seq, "tflops_per_sample": per_sample / 1e12,
            "samples_per_s_per_node_at_40pct_mfu": per_node}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard of the benchmark's shards")
    parser.add_argument("--reads", type=int, default=400, help="raw reads per mode in the access comparison")
    parser.add_argument("--access-worker", choices=["whole_shards", "indexed"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.access_worker:
        print(json.dumps(access_worker(args.shards, args.access_worker, args.reads)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(Path(tmp), args.scenes, args.shard_size)
        access = access_comparison(shards, args.reads)
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
    print(json.dumps({"loader": results, "sample_access": access, "8b_node_requirement": need}, indent=2))


if __name__ == "__main__":
    main()
