#!/usr/bin/env bash
# The main job: set up the venv if needed, then run the whole workflow at toy scale on this machine
# (perceptio_dist/experiments/toy/demo.py): render scenes, train the depth tokenizer, preprocess with `ray job submit`
# on a local Ray head, train the toy-spatial Perceptio with and without depth tokens on two CPU ranks
# (DeepSpeed ZeRO-3, a checkpoint midway), export and evaluate both, write runs/toy_data/report.md.
# Each stage reuses what an earlier run finished.
#   ./run_demo.sh                      # full mode
#   ./run_demo.sh --quick              # a few minutes, same stages, smaller (runs/demo_quick)
#   ./run_demo.sh train.max_steps=800  # training overrides for both models
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec python -m perceptio_dist.cli.demo "$@"
