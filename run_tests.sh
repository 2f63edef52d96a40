#!/usr/bin/env bash
# The test suite: set up the venv if needed, then run pytest. Extra arguments go to pytest,
# e.g. `./run_tests.sh -m slow` for the long checks or `./run_tests.sh tests/test_config.py`.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec python -m pytest "$@"
