#!/usr/bin/env bash
# Create or reuse ./.venv with the pinned dependencies. Sourced by run_demo.sh and run_tests.sh.
#
# Why the steps look like this (DESIGN.md section 6):
# * every install goes through constraints.txt, which pins torch==2.13.0: the CPU wheel on these
#   machines. Without the pin pip resolves a multi-GB CUDA build.
# * the `sam2` package is installed with --no-deps (its requirements pull torchvision, whose only
#   reachable wheels are CUDA builds that break `import torchvision` and, through it,
#   transformers on CPU) and without its optional CUDA extension; what it really needs at import
#   time (hydra-core, iopath, omegaconf, tqdm, pillow, numpy) is in our own dependencies.
# * the venv is rebuilt only when pyproject.toml or constraints.txt change (a stamp holds their hash).
# * DeepSpeed JIT-compiles its CPU shared-memory op (deepspeed_shm_comm) the first time a process starts its
#   backend, under a lock file in TORCH_EXTENSIONS_DIR. The default folder (~/.cache/torch_extensions) is shared
#   by every clone, and a clone in another path makes torch rebuild it there; a rank killed while compiling (a
#   test's timeout, a preemption test, Ray's memory monitor) leaves the lock behind and every later DeepSpeed
#   start waits on it forever. So the cache lives in this venv, and one process builds it here, before any run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PERCEPTIO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${PERCEPTIO_EXTRAS:-dev}"
STAMP="$VENV/.perceptio-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-32)-$EXTRAS"

installed=0
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  installed=1
  echo "[venv] installing pinned dependencies into $VENV (first run: a few minutes)" >&2
  "$PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install -c "$ROOT/constraints.txt" pip setuptools wheel
  "${pip[@]}" install -c "$ROOT/constraints.txt" -e "${ROOT}[${EXTRAS}]"
  SAM2_BUILD_CUDA=0 "${pip[@]}" install -c "$ROOT/constraints.txt" --no-deps --no-build-isolation sam2
  "$VENV/bin/python" - <<'PY'
import importlib, sys
for mod in ("torch", "transformers", "deepspeed", "sam2", "perceptio_dist"):
    importlib.import_module(mod)
try:
    import torchvision  # noqa: F401
    sys.exit("torchvision got installed; it breaks transformers on CPU machines. Remove it from the venv.")
except ImportError:
    pass
PY
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
# built when missing, and again after a (re)install, when DeepSpeed or torch may have changed
if [ "$installed" = 1 ] || ! compgen -G "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/"*.so > /dev/null; then
  echo "[venv] building DeepSpeed's CPU communication op into $TORCH_EXTENSIONS_DIR (about 30 s)" >&2
  if ! ops_log="$("$VENV/bin/python" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' 2>&1)"; then
    echo "$ops_log" | tail -20 >&2
    echo "[venv] building DeepSpeed's CPU communication op into $TORCH_EXTENSIONS_DIR failed (above)" >&2
    exit 1
  fi
fi
