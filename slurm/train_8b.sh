#!/usr/bin/env bash
# Train Perceptio-8B with DeepSpeed ZeRO-3 on N nodes x 8 GPUs; preemption-safe and self-requeueing.
#
#   sbatch slurm/train_8b.sh                                    # the 8B recipe, 4 nodes x 8 GPUs
#   sbatch slurm/train_8b.sh                                    # again after a crash: continues the same run
#   sbatch --job-name=perceptio-8b-v2 slurm/train_8b.sh         # a new run (a new run folder)
#   sbatch --nodes=16 slurm/train_8b.sh                         # any sbatch option overrides the header
#   PERCEPTIO_OVERRIDES="train.lr=5e-5" sbatch slurm/train_8b.sh
#   PERCEPTIO_RECIPE=tiny_cpu PERCEPTIO_PROCS_PER_NODE=2 \
#     sbatch --gres=none --nodes=1 --cpus-per-task=2 --mem=8G slurm/train_8b.sh   # tiny run on a CPU node
#
# Launch layout: one task per node, each running `perceptio-train --nproc-per-node G`, i.e. torchrun with a
# c10d rendezvous hosted on the first node and reached at that node's NodeAddr (slurm/node_addr.sh; or
# PERCEPTIO_HEAD_ADDR), never through name resolution; slurm/on_node.sh gives each node its own address. Chosen over one task per GPU because torchrun then owns the local
# ranks (LOCAL_RANK, restarts, a clean process tree to signal) and the script does not depend on the
# cluster's srun/PMI GPU binding; the cost is one extra process per node.
#
# Preemption: SLURM sends SIGUSR1 to this script PERCEPTIO_GRACE seconds before the time limit (and
# `scancel --signal=USR1 --batch JOB` sends it by hand). The trap forwards it to srun, which forwards it
# to perceptio-train on every node, which forwards it to the ranks: they finish the current step, save a
# checkpoint together and exit with status 75. The script then requeues the job (`scontrol requeue`), and
# the next start resumes with `--resume auto` from the newest complete checkpoint. Requeued jobs become
# eligible again after SLURM's fixed delay (about two minutes).
#
# The run folder is named after the job name, not the job id: runs/<job name> under the checkout (or
# PERCEPTIO_RUN_DIR). A job resubmitted by hand with the same name (after a crash, a cancel, a node failure)
# continues from the newest complete checkpoint there; another --job-name (or PERCEPTIO_RUN_DIR) starts afresh.
# SLURM's own log is <job name>-<job id>.out in the directory you submit from (SLURM opens it before the script
# runs, so it must name a folder that exists); the script also keeps one log per start in <run folder>/logs/.
#
# Every cluster-specific value is an environment variable (defaults below) or an sbatch option.
#SBATCH --job-name=perceptio-8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

REQUEUE_EXIT_CODE=75             # perceptio_dist.train.signals.REQUEUE_EXIT_CODE
REQUEUE_MARKER=requeue.json      # perceptio_dist.train.signals.REQUEUE_MARKER
PEER_LOST_MARKER=peer_lost.json  # perceptio_dist.train.peer_loss.PEER_LOST_MARKER

# --- configuration (environment) -------------------------------------------------------------------
PERCEPTIO_ROOT=${PERCEPTIO_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}       # the repository checkout
PERCEPTIO_VENV=${PERCEPTIO_VENV:-$PERCEPTIO_ROOT/.venv}             # its virtual environment
PERCEPTIO_RECIPE=${PERCEPTIO_RECIPE:-perceptio_8b}                  # shipped recipe name or YAML path
PERCEPTIO_RUN_DIR=${PERCEPTIO_RUN_DIR:-$PERCEPTIO_ROOT/runs/${SLURM_JOB_NAME:-perceptio}}   # one per job name
PERCEPTIO_OVERRIDES=${PERCEPTIO_OVERRIDES:-}                        # extra dotted overrides, space separated
PERCEPTIO_PROCS_PER_NODE=${PERCEPTIO_PROCS_PER_NODE:-8}             # ranks per node (GPUs, or CPU ranks)
PERCEPTIO_RDZV_PORT=${PERCEPTIO_RDZV_PORT:-29500}                   # c10d rendezvous port on the first node
PERCEPTIO_HEAD_ADDR=${PERCEPTIO_HEAD_ADDR:-}                        # the first node's address; empty: its NodeAddr
PERCEPTIO_LOG_DIR=${PERCEPTIO_LOG_DIR:-$PERCEPTIO_RUN_DIR/logs}     # one log per job start (restart)
PERCEPTIO_MAX_RESTARTS=${PERCEPTIO_MAX_RESTARTS:-10}                # requeues after a lost node, at most

# --- communication and threads --------------------------------------------------------------------
# One OpenMP thread per rank unless the site says otherwise: the data loader and tokenizer threads
# already oversubscribe the cores, and GPU ranks gain nothing from more.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
# NCCL: fail fast on a dead peer instead of hanging until the time limit, and let the watchdog raise.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand/RoCE is found automatically; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA where the site requires.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Triton compiles its kernels into ~/.triton by default: on a shared home, 32 ranks compiling at once can fail.
# A node-local folder per job (the path is the same on every node, the folder is each node's own).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-$(id -un)-${SLURM_JOB_ID:-local}}
# Fewer out-of-memory failures from fragmentation as sequence lengths vary from step to step.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# wandb: offline unless the job has a key (sync later with `wandb sync RUN_DIR/wandb`).
if [ -z "${WANDB_API_KEY:-}" ]; then export WANDB_MODE=${WANDB_MODE:-offline}; fi

restart=${SLURM_RESTART_COUNT:-0}
mkdir -p "$PERCEPTIO_LOG_DIR"
log_file="$PERCEPTIO_LOG_DIR/${SLURM_JOB_ID:-local}-restart${restart}.log"
exec > >(tee -a "$log_file") 2>&1
echo "[train_8b.sh] job ${SLURM_JOB_ID:-local} start ${restart} on ${SLURM_JOB_NODELIST:-localhost} at $(date -Is)"

if [ ! -x "$PERCEPTIO_VENV/bin/perceptio-train" ]; then
    echo "[train_8b.sh] no perceptio-train in $PERCEPTIO_VENV: run ./run_demo.sh once or set PERCEPTIO_VENV" >&2
    exit 2
fi

head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
head_addr=${PERCEPTIO_HEAD_ADDR:-$("$PERCEPTIO_ROOT/slurm/node_addr.sh" "$head_node")}
nnodes=${SLURM_NNODES:-1}
read -r -a extra_overrides <<< "$PERCEPTIO_OVERRIDES"
echo "[train_8b.sh] $nnodes node(s) x $PERCEPTIO_PROCS_PER_NODE rank(s); rendezvous at $head_addr:$PERCEPTIO_RDZV_PORT"
rm -f "$PERCEPTIO_RUN_DIR/$REQUEUE_MARKER" "$PERCEPTIO_RUN_DIR/$PEER_LOST_MARKER"  # only this start's count

# The step runs one perceptio-train per node; --kill-on-bad-exit stops the others if one node crashes (a node that
# hangs instead is caught by the collective timeout, parallel.timeout_minutes). Since SLURM 22.05 srun does not
# inherit the job's --cpus-per-task: without it each node's ranks and loader workers would share one core.
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 --chdir="$PERCEPTIO_ROOT" \
    "$PERCEPTIO_ROOT/slurm/on_node.sh" "$PERCEPTIO_VENV/bin/perceptio-train" \
    --nproc-per-node "$PERCEPTIO_PROCS_PER_NODE" --nnodes "$nnodes" \
    --rdzv-endpoint "$head_addr:$PERCEPTIO_RDZV_PORT" --rdzv-id "${SLURM_JOB_ID:-local}" \
    --resume auto --recipe "$PERCEPTIO_RECIPE" \
    "logging.output_dir=$PERCEPTIO_RUN_DIR" "${extra_overrides[@]}" &
step_pid=$!

# shellcheck disable=SC2317,SC2329  # called from the traps below
forward_signal() {
    echo "[train_8b.sh] received $1 at $(date -Is): asking the ranks to checkpoint and stop"
    kill -s "$1" "$step_pid" 2>/dev/null
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until the step has really ended.
status=0
while true; do
    wait "$step_pid"
    status=$?
    if ! kill -0 "$step_pid" 2>/dev/null; then break; fi
done

# The ranks saved a checkpoint after a stop signal: rank 0 wrote the marker before any rank exited. With several
# nodes the status may not say so: the first node to report 75 makes srun (--kill-on-bad-exit) end the others.
if [ "$status" -eq "$REQUEUE_EXIT_CODE" ] || [ -f "$PERCEPTIO_RUN_DIR/$REQUEUE_MARKER" ]; then
    echo "[train_8b.sh] checkpoint saved after a stop signal: requeueing job ${SLURM_JOB_ID:-local}"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
# A rank saw a peer die or hang (perceptio_dist/train/peer_loss.py): requeue, as after a preemption. A node that
# died with its slurmd is handled by SLURM itself: once it marks the node down (SlurmdTimeout) it requeues the job.
if [ "$status" -ne 0 ] && [ -f "$PERCEPTIO_RUN_DIR/$PEER_LOST_MARKER" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    if [ "$restart" -lt "$PERCEPTIO_MAX_RESTARTS" ]; then
        echo "[train_8b.sh] a node was lost (status $status): requeueing job $SLURM_JOB_ID to resume from the newest complete checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[train_8b.sh] a node was lost and the job already restarted $restart times (PERCEPTIO_MAX_RESTARTS): not requeueing" >&2
fi
echo "[train_8b.sh] training ended with status $status at $(date -Is)"
exit "$status"
