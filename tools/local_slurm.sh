#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for the launch tests and for trying the scripts in slurm/.
#
#   tools/local_slurm.sh start [DIR]    install slurm-wlm + munge if missing, write DIR/slurm.conf, start
#                                       munged, slurmctld and slurmd (all state, logs and pids under DIR)
#   tools/local_slurm.sh stop [DIR]     stop the three daemons by their pid files
#   tools/local_slurm.sh status [DIR]   sinfo for the cluster in DIR
#   tools/local_slurm.sh env [DIR]      print the `export SLURM_CONF=...` line the client commands need
#
# DIR defaults to $LOCAL_SLURM_DIR or /tmp/perceptio_slurm. Ports: $LOCAL_SLURM_PORT (slurmctld, default
# 6817) and the next one (slurmd). No accounting database; one partition "debug" holding "localhost".
# The machine's hostname need not be localhost: slurmd is started with -N localhost.
set -euo pipefail

command_name=${1:-}
DIR=${2:-${LOCAL_SLURM_DIR:-/tmp/perceptio_slurm}}
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

write_config() {
    local cpus memory_mb user
    # nproc honours OMP_NUM_THREADS (clusters and torchrun export it as 1): count the CPUs this process may use.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    user=$(id -un)
    cat > "$DIR/slurm.conf" <<EOF
# Written by tools/local_slurm.sh: a one-node cluster on 127.0.0.1, all state under $DIR.
ClusterName=perceptio-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Requeued jobs may run again; give a job 60 s between SIGTERM and SIGKILL to finish its checkpoint.
JobRequeue=1
KillWait=60
SchedulerParameters=nohold_on_prolog_fail
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
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
    if ! pid_alive "$DIR/run/slurmd.pid"; then
        slurmd -f "$SLURM_CONF" -N localhost
    fi
    local tries=0
    until sinfo -h -n localhost -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
        tries=$((tries + 1))
        if [ "$tries" -gt 60 ]; then
            tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
            die "the node did not become idle within 60 s (logs above)"
        fi
        sleep 1
    done
    echo "local_slurm: cluster up; export SLURM_CONF=$SLURM_CONF" >&2
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
    stop_pid_file "$DIR/run/slurmd.pid"
    stop_pid_file "$DIR/run/slurmctld.pid"
    stop_pid_file "$DIR/run/munged.pid"
    echo "local_slurm: stopped" >&2
}

case "$command_name" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$DIR/slurm.conf" sinfo ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    *) die "usage: tools/local_slurm.sh start|stop|status|env [DIR]" ;;
esac
