"""Packed against padded micro-batches: real tokens/s, padding and peak memory, on a realistic length mix, in one run.

    python tools/bench_packing.py [--samples 96] [--micro 4] [--threads 2]

The mix (proportions chosen after the 8B data: a single-tile referring sample is ~400 tokens, a 13-tile one
~3,600): single-tile images with a short answer (50 %), single-tile with a long answer (20 %), 5 tiles with a
short answer (20 %) and 13 tiles with a long answer (10 %); half of the answers open with a depth block. The
conversations are encoded by the real conversation code (data/conversation.py) with the tiny tokenizer; images are
random pixels (the timing does not depend on them).

The model is the tiny recipe with the proportions of the 8B one where they matter here: a language model much
larger than the vision tower (text 256 wide x 4 layers, vision 32 wide x 2 layers, 16 tokens per 64-px tile),
fp32 on CPU. A step is forward, backward and a torch AdamW update of the whole training module (model and
objective). The padded baseline is measured in the same run:

* padded: micro-batches of ``--micro`` samples, one row each, padded to the longest;
* packed: the same sample stream in micro-batches of as many samples as keep the mean tensor size (rows x
  longest row, the activation memory) at or below the padded one's, packed into rows of data.max_seq_len tokens.

Each mode runs in a fresh process, so its peak RSS is its own (the imports and the model are the same in both).
Tokens/s counts real tokens only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIX = [  # (share, tiles, answer words)
    (0.5, 1, 6), (0.2, 1, 80), (0.2, 5, 6), (0.1, 13, 80),
]
MAX_SEQ_LEN = 512
MODEL = ["model.backbone.text.hidden_size=256", "model.backbone.text.num_layers=4", "model.backbone.text.num_heads=8",
         "model.backbone.text.num_kv_heads=4", "model.backbone.text.intermediate_size=688",
         "model.backbone.max_tiles=13", "model.depth_vqvae.checkpoint=null", f"data.max_seq_len={MAX_SEQ_LEN}",
         "train.precision=fp32"]


def setup():
    import torch

    from perceptio_dist.config.training import load_config
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer

    cfg = load_config("tiny_cpu", MODEL)
    tokenizer = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    model = build_perceptio(cfg.model, tokenizer, torch.float32, seed=0).train()
    return cfg, tokenizer, model


def sample_stream(cfg, tokenizer, model, count: int, seed: int = 0, mix=None):
    """``count`` samples of the mix (``mix``: (share, tiles, answer words) rows, default MIX), the same for every
    mode."""
    import numpy as np
    import torch

    from perceptio_dist.data.batch import Sample
    from perceptio_dist.data.conversation import ImageTokens, encode_conversation, spatial_answer_ids
    from perceptio_dist.model.backbone import image_tokens_per_tile

    b = cfg.model.backbone
    image = ImageTokens(b.image_start_token, b.image_token, b.image_end_token, image_tokens_per_tile(b))
    ids = model.token_ids
    rng = np.random.default_rng(seed)
    words = ["left", "right", "near", "far", "red", "cup", "table", "the", "a", "box", "chair", "behind"]
    mix = mix or MIX
    shares = np.array([m[0] for m in mix])
    tile, sam, depth = b.vision.image_size, model.seg_head.image_size, cfg.model.depth_vqvae.input_size
    samples = []
    for _ in range(count):
        _, tiles, answer_words = mix[rng.choice(len(mix), p=shares / shares.sum())]
        with_depth = bool(rng.random() < 0.5)
        codes = rng.integers(0, ids.num_codes, ids.num_depth_tokens).tolist() if with_depth else None
        question = " ".join(rng.choice(words, 12))
        answer = " ".join(rng.choice(words, answer_words))
        input_ids, labels = encode_conversation(tokenizer, image, tiles, [(question, answer)],
                                                spatial_answer_ids(ids, False, codes))
        blocks = 1 if with_depth else 0
        samples.append(Sample(
            input_ids=input_ids, labels=labels,
            pixel_values=torch.from_numpy(rng.standard_normal((tiles, 3, tile, tile), dtype=np.float32)),
            sam_image=torch.zeros(3, sam, sam), seg_masks=torch.zeros(0, sam, sam),
            teacher_depth=torch.zeros(blocks, 1, depth, depth), has_teacher_depth=torch.zeros(blocks, dtype=torch.bool)))
    return samples


def micro_batches(samples, mode: str, micro: int):
    """Consecutive groups of ``micro`` samples (the last one may be smaller), padded or packed."""
    from perceptio_dist.data.batch import collate
    from perceptio_dist.data.packing import pack

    groups = [samples[i:i + micro] for i in range(0, len(samples), micro)]
    return [collate(g, 0) if mode == "padded" else pack(g, MAX_SEQ_LEN, 0) for g in groups]


def packed_micro_for_same_memory(samples, padded_micro: int) -> int:
    """The largest packed micro-batch whose mean tensor size is at most the padded micro-batches' mean."""
    padded = [b.input_ids.numel() for b in micro_batches(samples, "padded", padded_micro)]
    target = sum(padded) / len(padded)
    best = padded_micro
    for m in range(padded_micro, 8 * padded_micro + 1):
        sizes = [b.input_ids.numel() for b in micro_batches(samples, "packed", m)]
        if sizes and sum(sizes) / len(sizes) <= target:
            best = m
    return best


def run_mode(mode: str, micro: int, count: int, threads: int) -> dict:
    import torch

    from perceptio_dist.losses.lm_head_module import LMHeadTermsModule
    from perceptio_dist.losses.objective import PerceptioObjective
    from perceptio_dist.parallel.zero import PerceptioTrainingModule

    torch.set_num_threads(threads)
    cfg, tokenizer, model = setup()
    batches = micro_batches(sample_stream(cfg, tokenizer, model, count), mode, micro)
    warm_up = micro_batches(sample_stream(cfg, tokenizer, model, 2 * micro, seed=1), mode, micro)
    module = PerceptioTrainingModule(model, PerceptioObjective(cfg.objective, model.token_ids),
                                     LMHeadTermsModule.from_config(cfg.objective, torch.device("cpu")))  # CPU back end
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        loss, _, _ = module(**batch.as_dict())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in warm_up:  # other samples: every mode then times exactly the same ones
        step(batch)
    timed = batches
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    seconds = time.perf_counter() - start
    tokens = sum(b.num_tokens for b in timed)
    positions = [b.input_ids.numel() for b in timed]
    return {"mode": mode, "micro": micro, "micro_batches": len(timed), "samples": sum(b.num_samples for b in timed),
            "rows_mean": sum(b.input_ids.shape[0] for b in timed) / len(timed),
            "positions_mean": sum(positions) / len(positions), "positions_max": max(positions),
            "padding": 1 - tokens / sum(positions), "tokens_per_s": tokens / seconds,
            "samples_per_s": sum(b.num_samples for b in timed) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--micro", type=int, default=4, help="padded micro-batch (samples)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_mode(args.worker[0], int(args.worker[1]), args.samples, args.threads)))
        return
    if args.samples < 2 * args.micro or args.micro < 1:
        parser.error("--micro must be positive and --samples at least 2 x --micro")
    cfg, tokenizer, model = setup()
    samples = sample_stream(cfg, tokenizer, model, args.samples)
    lengths = sorted(s.input_ids.numel() for s in samples)
    packed_micro = packed_micro_for_same_memory(samples, args.micro)
    del model
    print(f"{len(samples)} samples, tokens min / median / max {lengths[0]} / {lengths[len(lengths) // 2]} / "
          f"{lengths[-1]}; rows of {MAX_SEQ_LEN} tokens; packed micro-batch {packed_micro} samples for the padded "
          f"{args.micro}'s memory", flush=True)
    results = []
    for mode, micro in (("padded", args.micro), ("packed", packed_micro)):
        proc = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--threads", str(args.threads),
                               "--worker", mode, str(micro)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]
    print("| mode | samples / micro-batch | rows | positions / micro-batch (mean, max) | padding | real tokens/s "
          "| samples/s | peak RSS MB | tokens/s vs padded |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['mode']} | {r['micro']} | {r['rows_mean']:.1f} | {r['positions_mean']:.0f}, {r['positions_max']} "
              f"| {r['padding']:.1%} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
