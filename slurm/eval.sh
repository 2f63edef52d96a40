#!/usr/bin/env bash
# Evaluate a checkpoint or an exported model, distributed over this job's GPUs.
#
#   PERCEPTIO_MODEL=runs/perceptio-8b/export sbatch slurm/eval.sh
#   PERCEPTIO_MODEL=... PERCEPTIO_EVAL_ARGS="--hardblink /data/hardblink" sbatch --nodes=2 slurm/eval.sh
#
# Launch layout as in train_8b.sh: one task per node, each running torchrun for its local ranks (one per GPU the
# job holds on the node) with a c10d rendezvous on the first node; each rank builds the bf16 model directly on its
# own GPU (cuda:LOCAL_RANK); results are gathered on rank 0. On CPU nodes (--gres=none) the ranks run in fp32.
# SLURM's log: <job name>-<job id>.out in the submit directory; the report: runs/eval-<job id>/ (PERCEPTIO_EVAL_OUT).
# PERCEPTIO_EVAL_ARGS names the benchmarks, e.g.
#   "--hardblink /data/hardblink --refcoco /data/refer --refcoco-dataset refcoco+ --mmbench /data/mmbench_dev.tsv"
#SBATCH --job-name=perceptio-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -uo pipefail

PERCEPTIO_ROOT=${PERCEPTIO_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}   # the repository checkout
PERCEPTIO_VENV=${PERCEPTIO_VENV:-$PERCEPTIO_ROOT/.venv}         # its virtual environment
PERCEPTIO_MODEL=${PERCEPTIO_MODEL:?set PERCEPTIO_MODEL to an exported folder or a training checkpoint (global_stepN)}
PERCEPTIO_EVAL_OUT=${PERCEPTIO_EVAL_OUT:-$PERCEPTIO_ROOT/runs/eval-${SLURM_JOB_ID:-local}}
PERCEPTIO_EVAL_ARGS=${PERCEPTIO_EVAL_ARGS:-}                     # further perceptio-eval arguments
PERCEPTIO_PROCS_PER_NODE=${PERCEPTIO_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}  # ranks per node: one per GPU
PERCEPTIO_EVAL_DEVICE=${PERCEPTIO_EVAL_DEVICE:-auto}             # auto: rank i on the node's GPU i in bf16, else CPU
PERCEPTIO_RDZV_PORT=${PERCEPTIO_RDZV_PORT:-29501}               # c10d rendezvous port on the first node
PERCEPTIO_HEAD_ADDR=${PERCEPTIO_HEAD_ADDR:-}                    # the first node's address; empty: its NodeAddr

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

eval_module=perceptio_dist.cli.eval
if ! "$PERCEPTIO_VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$eval_module') is None)" 2>/dev/null; then
    echo "[eval.sh] $eval_module is not importable from $PERCEPTIO_VENV: run ./run_tests.sh once or set PERCEPTIO_VENV" >&2
    exit 2
fi

head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
head_addr=${PERCEPTIO_HEAD_ADDR:-$("$PERCEPTIO_ROOT/slurm/node_addr.sh" "$head_node")}
read -r -a extra_args <<< "$PERCEPTIO_EVAL_ARGS"
mkdir -p "$PERCEPTIO_EVAL_OUT"
# As in train_8b.sh: the rendezvous at the first node's NodeAddr, each node's own address (on_node.sh), and
# the job's CPUs given to every task explicitly (srun does not inherit --cpus-per-task since SLURM 22.05).
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 --chdir="$PERCEPTIO_ROOT" \
    "$PERCEPTIO_ROOT/slurm/on_node.sh" "$PERCEPTIO_VENV/bin/python" -m torch.distributed.run \
    --nnodes="${SLURM_NNODES:-1}" --nproc-per-node="$PERCEPTIO_PROCS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$PERCEPTIO_RDZV_PORT" --rdzv-id="${SLURM_JOB_ID:-local}" \
    -m "$eval_module" --model "$PERCEPTIO_MODEL" --out "$PERCEPTIO_EVAL_OUT" --device "$PERCEPTIO_EVAL_DEVICE" \
    "${extra_args[@]}"
