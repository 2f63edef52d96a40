#!/usr/bin/env bash
# One task of a multi-node job step, started by srun on every node: makes the node's address known to torchrun,
# says what the task was given, then runs the command.
#
#   srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" slurm/on_node.sh COMMAND [ARGS...]
#
# torchrun reads PET_<OPTION> for every option its command line leaves out (PET_LOCAL_ADDR: --local-addr,
# PET_RDZV_CONF: --rdzv-conf), so COMMAND may be torchrun itself or perceptio-train, which starts it.
#  - --local-addr: the node's NodeAddr from SLURM, so that no rank depends on the node's name resolving on the
#    training network (PERCEPTIO_NODE_ADDR overrides it, e.g. with the address of a chosen interface).
#  - --rdzv-conf is_host: the job's first node hosts the c10d rendezvous store and every other node only
#    connects to it. Left to itself torchrun hosts the store on any node whose address is loopback or its own;
#    where two nodes share an address range (a test cluster on one machine) they would race for it.
set -euo pipefail

node=${SLURMD_NODENAME:-$(hostname)}
export PET_LOCAL_ADDR=${PERCEPTIO_NODE_ADDR:-$("$(dirname "$0")/node_addr.sh" "$node")}
# Appended to what the job already sets (e.g. PET_RDZV_CONF=join_timeout=1200 exported before sbatch).
if [ "${SLURM_NODEID:-0}" = 0 ]; then is_host=true; else is_host=false; fi
export PET_RDZV_CONF="${PET_RDZV_CONF:+$PET_RDZV_CONF,}is_host=$is_host"
echo "[on_node.sh] node ${SLURM_NODEID:-0} $node ($PET_LOCAL_ADDR): $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs for this task"
exec "$@"
