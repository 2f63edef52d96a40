#!/usr/bin/env bash
# The main job: set up the venv if needed, then
#   1. render 64 synthetic spatial scenes with pybullet              (runs/tiny_data/scenes)
#   2. train the tiny depth tokenizer (VQ-VAE) on their exact depth   (runs/tiny_data/depth_vqvae)
#   3. preprocess the scenes into webdataset shards with Ray Data     (runs/tiny_data/shards)
#   4. train the tiny Perceptio on two CPU ranks with DeepSpeed ZeRO-3 over gloo (runs/tiny_cpu),
#      resuming from its newest checkpoint when an earlier run was interrupted
#   5. export the final checkpoint to an inference folder                (runs/tiny_cpu/export)
# Each stage reuses what an earlier run finished. Extra arguments are training config overrides,
# e.g. ./run_demo.sh train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
perceptio-scenes --out runs/tiny_data/scenes --num 64
if [ ! -f runs/tiny_data/depth_vqvae/tokenizer.json ]; then
  perceptio-vqvae train --config vqvae_tiny
fi
python -m ray_jobs.preprocess --config preprocess_tiny
perceptio-train --nproc-per-node 2 --recipe tiny_cpu --resume auto "$@"
checkpoints=runs/tiny_cpu/checkpoints
perceptio-export --checkpoint "$checkpoints/$(cat "$checkpoints/latest")" --out runs/tiny_cpu/export
