#!/usr/bin/env bash
# Preprocess raw datasets into webdataset shards with a Ray cluster made of this job's nodes.
#
#   sbatch slurm/preprocess_ray.sh                                          # the 8B teacher pass
#   PERCEPTIO_RECIPE=preprocess_8b_codes sbatch slurm/preprocess_ray.sh     # the 8B code pass
#   PERCEPTIO_RECIPE=preprocess_tiny PERCEPTIO_OVERRIDES="sources.0.path=/data/scenes output_dir=/data/shards" \
#     sbatch --gres=none --nodes=1 --cpus-per-task=2 --mem=8G slurm/preprocess_ray.sh     # a CPU node
#
# The first node runs the Ray head (GCS, dashboard, job server) and a share of the work; every other
# node joins as a worker through `srun`. Nodes reach each other at their NodeAddr from SLURM
# (slurm/node_addr.sh; PERCEPTIO_HEAD_ADDR overrides the head's), never through name resolution. The script
# waits until all nodes have joined, submits the job with `ray job submit` exactly as on a standing Ray
# cluster, and when the job ends (or the allocation is cancelled) stops this job's Ray processes, and only
# those: a SIGTERM to each node's `ray start --block`, which takes down its own raylet and workers (never
# `ray stop`, which would stop every Ray on a shared node, other jobs' included). Each node keeps its own
# session folder and dashboard agent port, so nodes sharing a host (a test cluster on one machine) do not
# collide. The cluster is private to the job: the dashboard and job API listen on the head node only and
# require a token generated for this job (Ray token authentication).
# A worker node lost mid-job: Ray retries its tasks and restarts its actors on the nodes left; the shards
# come out as on an undisturbed run (the driver keeps each record once). If the job fails all the same,
# submitting it again writes only the shards that are missing.
# The job runs the installed `perceptio-preprocess` of PERCEPTIO_VENV in PERCEPTIO_ROOT (nothing is uploaded). SLURM's log:
# <job name>-<job id>.out in the submit directory.
#SBATCH --job-name=perceptio-preprocess
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -uo pipefail

# --- configuration (environment) -------------------------------------------------------------------
PERCEPTIO_ROOT=${PERCEPTIO_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}             # the repository checkout
PERCEPTIO_VENV=${PERCEPTIO_VENV:-$PERCEPTIO_ROOT/.venv}                   # its virtual environment
PERCEPTIO_RECIPE=${PERCEPTIO_RECIPE:-${PERCEPTIO_PREPROCESS_CONFIG:-preprocess_8b_teacher}}  # recipe name or YAML
PERCEPTIO_OVERRIDES=${PERCEPTIO_OVERRIDES:-}                              # dotted overrides, space separated
PERCEPTIO_RAY_PORT=${PERCEPTIO_RAY_PORT:-6379}                            # GCS port on the head node
PERCEPTIO_RAY_DASHBOARD_PORT=${PERCEPTIO_RAY_DASHBOARD_PORT:-8265}        # job API port on the head node
PERCEPTIO_RAY_TMP=${PERCEPTIO_RAY_TMP:-/tmp/ray_${SLURM_JOB_ID:-local}}   # Ray's session folder (node-local, short:
                                                                          # its socket paths must stay < 108 bytes)
PERCEPTIO_RAY_CLIENT_PORT=${PERCEPTIO_RAY_CLIENT_PORT:-10001}            # Ray client server port on the head node
PERCEPTIO_RAY_AGENT_PORT=${PERCEPTIO_RAY_AGENT_PORT:-52365}              # dashboard agent port of the first node;
                                                                          # node i uses this + i
PERCEPTIO_HEAD_ADDR=${PERCEPTIO_HEAD_ADDR:-}                              # the head's address; empty: its NodeAddr
PERCEPTIO_GPUS_PER_NODE=${PERCEPTIO_GPUS_PER_NODE:-8}                     # GPUs Ray may give the teacher
PERCEPTIO_RAY_CPUS_PER_NODE=${PERCEPTIO_RAY_CPUS_PER_NODE:-}              # Ray's logical CPUs per node; empty: the
                                                                          # task's CPUs (--cpus-per-task)
PERCEPTIO_WAIT_SECONDS=${PERCEPTIO_WAIT_SECONDS:-300}                     # how long nodes may take to join

ray_bin="$PERCEPTIO_VENV/bin/ray"
if [ ! -x "$ray_bin" ]; then
    echo "[preprocess_ray.sh] no ray in $PERCEPTIO_VENV: run ./run_demo.sh once or set PERCEPTIO_VENV" >&2
    exit 2
fi
export PATH="$PERCEPTIO_VENV/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0

mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}")
head_node=${nodes[0]}
# The head's address as the other nodes reach it (a single-node run stays on loopback).
if [ -n "$PERCEPTIO_HEAD_ADDR" ]; then
    head_addr=$PERCEPTIO_HEAD_ADDR
elif [ "${#nodes[@]}" -eq 1 ]; then
    head_addr=127.0.0.1
else
    head_addr=$("$PERCEPTIO_ROOT/slurm/node_addr.sh" "$head_node")
fi
task_cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
cpus=${PERCEPTIO_RAY_CPUS_PER_NODE:-$task_cpus}
gpus=$PERCEPTIO_GPUS_PER_NODE
if ! command -v nvidia-smi >/dev/null 2>&1; then gpus=0; fi

# A token only this job knows, on the shared filesystem so that every node and the client read it.
token_dir="$PERCEPTIO_ROOT/runs/ray_tokens"
mkdir -p "$token_dir" && chmod 0700 "$token_dir"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$token_dir/${SLURM_JOB_ID:-local}.token"
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")

ray_pids=()
# shellcheck disable=SC2329  # called from shutdown
any_alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
# shellcheck disable=SC2317,SC2329  # called from the trap
shutdown() {
    local pid tries=0
    echo "[preprocess_ray.sh] stopping this job's Ray processes on ${#nodes[@]} node(s)"
    # srun passes SIGTERM on to its task, `ray start --block`, which stops its node's raylet and workers.
    for pid in "${ray_pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    while [ "$tries" -lt 30 ] && any_alive "${ray_pids[@]}"; do sleep 1; tries=$((tries + 1)); done
    for pid in "${ray_pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done  # srun killed: SLURM ends the step
    wait 2>/dev/null
    rm -f "$RAY_AUTH_TOKEN_PATH"
}
trap shutdown EXIT

# ray_node_args INDEX NODE: the options every node's `ray start` shares, with this node's own address, session
# folder and dashboard agent port.
ray_node_args() {
    local addr=$head_addr
    if [ "$1" -gt 0 ]; then addr=$("$PERCEPTIO_ROOT/slurm/node_addr.sh" "$2"); fi
    echo "--node-ip-address=$addr --temp-dir=$PERCEPTIO_RAY_TMP/$2 --dashboard-agent-listen-port=$((PERCEPTIO_RAY_AGENT_PORT + $1))"
}

echo "[preprocess_ray.sh] Ray head on $head_node ($head_addr), ${#nodes[@]} node(s), $cpus CPUs and $gpus GPUs each"
# Every srun names the task's CPUs: since SLURM 22.05 a step does not inherit the job's --cpus-per-task.
read -r -a node_args <<< "$(ray_node_args 0 "$head_node")"
srun --nodes=1 --ntasks=1 --cpus-per-task="$task_cpus" --overlap -w "$head_node" \
    "$ray_bin" start --head --block --port="$PERCEPTIO_RAY_PORT" "${node_args[@]}" \
    --ray-client-server-port="$PERCEPTIO_RAY_CLIENT_PORT" \
    --dashboard-host="$head_addr" --dashboard-port="$PERCEPTIO_RAY_DASHBOARD_PORT" --include-dashboard=true \
    --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats &
ray_pids+=($!)

# Wait for the head before starting workers (they need its GCS).
deadline=$((SECONDS + PERCEPTIO_WAIT_SECONDS))
until "$ray_bin" status --address="$head_addr:$PERCEPTIO_RAY_PORT" >/dev/null 2>&1; do
    if ! kill -0 "${ray_pids[0]}" 2>/dev/null || [ "$SECONDS" -gt "$deadline" ]; then
        echo "[preprocess_ray.sh] the Ray head did not start (its output is above)" >&2
        exit 1
    fi
    sleep 2
done

# One step per worker node: each joins with its own address, session folder and ports.
for ((i = 1; i < ${#nodes[@]}; i++)); do
    read -r -a node_args <<< "$(ray_node_args "$i" "${nodes[$i]}")"
    srun --nodes=1 --ntasks=1 --cpus-per-task="$task_cpus" --overlap -w "${nodes[$i]}" \
        "$ray_bin" start --block --address="$head_addr:$PERCEPTIO_RAY_PORT" "${node_args[@]}" \
        --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats &
    ray_pids+=($!)
done

# Wait until every node has joined.
until [ "$("$PERCEPTIO_VENV/bin/python" -c "
import ray, sys
ray.init(address='$head_addr:$PERCEPTIO_RAY_PORT', logging_level='ERROR', log_to_driver=False)
print(sum(1 for n in ray.nodes() if n['Alive']))
" 2>/dev/null)" = "${#nodes[@]}" ]; do
    if [ "$SECONDS" -gt "$deadline" ]; then
        echo "[preprocess_ray.sh] not all ${#nodes[@]} nodes joined within ${PERCEPTIO_WAIT_SECONDS}s" >&2
        exit 1
    fi
    sleep 3
done
echo "[preprocess_ray.sh] all ${#nodes[@]} node(s) joined; submitting the preprocessing job"

read -r -a extra_overrides <<< "$PERCEPTIO_OVERRIDES"
cd "$PERCEPTIO_ROOT" || exit 2
# The job server answers "No available agent" until the head's dashboard agent has registered, seconds after the
# node joined (more on a loaded node): retry that refusal only, until PERCEPTIO_WAIT_SECONDS have passed.
mkdir -p "$PERCEPTIO_RAY_TMP"
submit_log="$PERCEPTIO_RAY_TMP/submit.log"
submit_deadline=$((SECONDS + PERCEPTIO_WAIT_SECONDS))
attempt=0
while true; do
    attempt=$((attempt + 1))
    "$ray_bin" job submit --address "http://$head_addr:$PERCEPTIO_RAY_DASHBOARD_PORT" \
        -- env --chdir="$PERCEPTIO_ROOT" "$PERCEPTIO_VENV/bin/perceptio-preprocess" --recipe "$PERCEPTIO_RECIPE" "${extra_overrides[@]}" \
        < /dev/null 2>&1 | tee "$submit_log"
    status=${PIPESTATUS[0]}
    if [ "$status" -eq 0 ] || ! grep -q "No available agent" "$submit_log" || [ "$SECONDS" -gt "$submit_deadline" ]; then
        break
    fi
    echo "[preprocess_ray.sh] the job server is not ready yet (attempt $attempt); retrying in 5 s"
    sleep 5
done
echo "[preprocess_ray.sh] preprocessing job ended with status $status"
exit "$status"
