#!/usr/bin/env bash
# The main job: set up the venv if needed, then train the tiny Perceptio on two CPU ranks
# (DeepSpeed ZeRO-3 over gloo). Extra arguments are config overrides, e.g. train.max_steps=10.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec perceptio-train --nproc-per-node 2 --recipe tiny_cpu "$@"
