#!/usr/bin/env bash
# A SLURM cluster on this machine, for the launch tests and for trying the scripts in slurm/: one node, or
# several nodes, each a slurmd of its own on a loopback address of its own.
#
#   tools/local_slurm.sh start [--nodes N] [--slurmd-timeout S] [DIR]
#                                 install slurm-wlm + munge if missing, write DIR/slurm.conf, start munged,
#                                 slurmctld and N slurmd (all state, logs and pids under DIR)
#   tools/local_slurm.sh stop [DIR]     stop every daemon it started, by the pid files under DIR
#   tools/local_slurm.sh status [DIR]   sinfo for the cluster in DIR
#   tools/local_slurm.sh env [DIR]      print the `export SLURM_CONF=...` line the client commands need
#
# One node (the default): node "localhost" on 127.0.0.1 with every CPU. N nodes: n1 ... nN on 127.0.0.2,
# 127.0.0.3, ..., each with its own slurmd port, spool folder, pid and log file, and an equal share of the CPUs
# ($LOCAL_SLURM_CPUS_PER_NODE declares more, oversubscribing the cores). The node names do not resolve:
# the scripts must reach a node through its NodeAddr, as on a cluster whose node names are not on the
# training network. --slurmd-timeout (default 300 s, SLURM's) is how long an unresponsive node stays up
# before SLURM marks it down: a few seconds for node-loss tests.
# DIR defaults to $LOCAL_SLURM_DIR or /tmp/perceptio_slurm. Ports: $LOCAL_SLURM_PORT (slurmctld, default
# 6817) and the next N (one slurmd each). No accounting database; one partition "debug" holding every node.
set -euo pipefail

command_name=${1:-}
[ "$#" -gt 0 ] && shift
NODES=1
SLURMD_TIMEOUT=300
while [ "$#" -gt 0 ]; do
    case "$1" in
        --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        --slurmd-timeout) SLURMD_TIMEOUT=${2:?--slurmd-timeout needs seconds}; shift 2 ;;
        --slurmd-timeout=*) SLURMD_TIMEOUT=${1#--slurmd-timeout=}; shift ;;
        -*) echo "local_slurm: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
DIR=${1:-${LOCAL_SLURM_DIR:-/tmp/perceptio_slurm}}
CTLD_PORT=${LOCAL_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))

die() { echo "local_slurm: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "local_slurm: installing slurm-wlm and munge (Debian packages)" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "could not install slurm-wlm and munge with apt-get"
}

case "$NODES" in ''|*[!0-9]*|0) die "--nodes takes a positive number, not '$NODES'" ;; esac
[ "$NODES" -le 200 ] || die "--nodes: at most 200 (one loopback address each)"

# node_names: localhost for a one-node cluster, n1 ... nN otherwise.
node_names() {
    if [ "$NODES" -eq 1 ]; then echo localhost; else seq -f 'n%g' 1 "$NODES"; fi
}
node_addr() {  # node_addr NAME: its loopback address
    if [ "$1" = localhost ]; then echo 127.0.0.1; else echo "127.0.0.$(( ${1#n} + 1 ))"; fi
}
node_port() {  # node_port NAME: its slurmd port
    if [ "$1" = localhost ]; then echo "$SLURMD_PORT"; else echo $(( SLURMD_PORT + ${1#n} - 1 )); fi
}

write_config() {
    local cpus node_cpus memory_mb user node overrides=""
    # nproc honours OMP_NUM_THREADS (clusters and torchrun export it as 1): count the CPUs this process may use.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    node_cpus=$(( cpus / NODES > 0 ? cpus / NODES : 1 ))
    node_cpus=${LOCAL_SLURM_CPUS_PER_NODE:-$node_cpus}
    memory_mb=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024) / NODES ))
    # Several nodes share this machine's cores: slurmd must take the declared CPUs, not count its own.
    if [ "$NODES" -gt 1 ] || [ "$node_cpus" -ne "$cpus" ]; then overrides="SlurmdParameters=config_overrides"; fi
    user=$(id -un)
    cat > "$DIR/slurm.conf" <<EOF
# Written by tools/local_slurm.sh: $NODES node(s) on loopback addresses, all state under $DIR.
ClusterName=perceptio-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
# %n: the node name, so that several slurmd on one machine keep their files apart.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# A node that does not answer for this long is marked down (its jobs requeued or ended).
SlurmdTimeout=$SLURMD_TIMEOUT
$overrides
# Requeued jobs may run again; give a job 60 s between SIGTERM and SIGKILL to finish its checkpoint.
JobRequeue=1
KillWait=60
SchedulerParameters=nohold_on_prolog_fail
MinJobAge=3600
EOF
    for node in $(node_names); do
        echo "NodeName=$node NodeAddr=$(node_addr "$node") Port=$(node_port "$node") CPUs=$node_cpus RealMemory=$memory_mb State=UNKNOWN" >> "$DIR/slurm.conf"
    done
    echo "PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$DIR/slurm.conf"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    local node nodes_up tries=0
    install_packages
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    # munged refuses a socket directory that others cannot traverse.
    chmod 0755 "$DIR" "$DIR/munge"
    if [ ! -f "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$DIR/munge/munge.key"
    fi
    write_config
    if ! pid_alive "$DIR/run/munged.pid"; then
        munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
    fi
    export SLURM_CONF="$DIR/slurm.conf"
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        slurmctld -f "$SLURM_CONF"
    fi
    for node in $(node_names); do
        mkdir -p "$DIR/spool/$node"
        if ! pid_alive "$DIR/run/slurmd-$node.pid"; then
            slurmd -f "$SLURM_CONF" -N "$node"
        fi
    done
    until nodes_up=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)$') \
            && [ "$nodes_up" -ge "$NODES" ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 60 ]; then
            tail -n 20 "$DIR"/log/*.log >&2 || true
            die "${nodes_up:-0} of $NODES node(s) became idle within 60 s (logs above)"
        fi
        sleep 1
    done
    echo "local_slurm: $NODES node(s) up; export SLURM_CONF=$SLURM_CONF" >&2
}

stop_pid_file() {
    local file=$1 pid tries=0
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 30 ]; do sleep 0.5; tries=$((tries + 1)); done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    local file pid
    for file in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmd.pid; do
        stop_pid_file "$file"
    done
    # Step daemons outlive a slurmd that is stopped (or killed) under a running job: this cluster's are the ones
    # started with its SLURM_CONF in their environment.
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$DIR/slurm.conf"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    stop_pid_file "$DIR/run/slurmctld.pid"
    stop_pid_file "$DIR/run/munged.pid"
    echo "local_slurm: stopped" >&2
}

case "$command_name" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$DIR/slurm.conf" sinfo ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    *) die "usage: tools/local_slurm.sh start [--nodes N] [--slurmd-timeout S] [DIR] | stop|status|env [DIR]" ;;
esac
