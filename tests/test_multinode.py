"""Several nodes as clusters run them: a two-node SLURM cluster on this machine (tools/local_slurm.sh --nodes 2:
two slurmd, n1 on 127.0.0.2 and n2 on 127.0.0.3, whose names do not resolve), the real scripts of slurm/ on it.

Default suite: one smoke test (two nodes train one rank each; every srun of the scripts hands its task the job's
CPUs). Behind `slow` (./run_tests.sh -m slow tests/test_multinode.py): two nodes equal one node, a checkpoint
moves between node counts, a node lost mid-run (killed, or frozen) and the run resumed, and preprocessing on a
two-node Ray cluster, with a worker node killed mid-job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from perceptio_dist.parallel.distributed import free_port
from perceptio_dist.train.checkpoint import read_marker

from .conftest import NO_TOKENIZER, ROOT, without_launcher_variables
from .test_checkpoint import losses, step_keys
from .test_slurm import VENV, _can_install_packages, _job_field, _sbatch, _wait_for_state

NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
SLURMD_TIMEOUT = 10  # seconds an unresponsive node stays up before SLURM marks it down and requeues its jobs
COLLECTIVE_TIMEOUT_MINUTES = 0.25  # 15 s: how long a rank waits for a frozen peer
STEPS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private two-node cluster, two CPUs per node (a survivor can do the work of both), stopped after the module."""
    if not shutil.which("slurmctld") and not _can_install_packages():
        pytest.skip("slurm-wlm is not installed and this user cannot install Debian packages")
    state = tmp_path_factory.mktemp("slurm2")
    port = free_port()
    while port > 65000:
        port = free_port()
    env = {**os.environ, "LOCAL_SLURM_PORT": str(port), "LOCAL_SLURM_CPUS_PER_NODE": "2"}
    start = subprocess.run([str(ROOT / "tools" / "local_slurm.sh"), "start", "--nodes", "2",
                            "--slurmd-timeout", str(SLURMD_TIMEOUT), str(state)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stderr[-3000:]
    client = {**without_launcher_variables(dict(os.environ)), "SLURM_CONF": str(state / "slurm.conf")}
    shm_before = set(os.listdir("/dev/shm"))
    try:
        yield {"env": client, "dir": state}
    finally:
        subprocess.run(["scancel", "--full", "--user", os.environ.get("USER", "root")], env=client, capture_output=True)
        subprocess.run([str(ROOT / "tools" / "local_slurm.sh"), "stop", str(state)], env=env, capture_output=True)
    assert not _daemons(state), "local_slurm.sh stop left daemons running"
    leaked = set(os.listdir("/dev/shm")) - shm_before
    assert not leaked, f"shared memory left behind: {sorted(leaked)}"


def _daemons(state: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if str(state / "slurm.conf") in " ".join(p.info["cmdline"] or [])]


def _job_processes(job: str, node: str | None = None) -> list[psutil.Process]:
    """The processes of a job's steps (not its batch script), on one node or all, found by their SLURM variables."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_STEP_ID", "batch") != "batch" \
                and (node is None or env.get("SLURMD_NODENAME") == node):
            found.append(p)
    return found


def _wait_until(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _train_env(run_dir: Path, shards: Path, procs_per_node: int, *extra: str) -> dict:
    # Global batch 4 on every layout: 2 ranks x accumulation 2 x micro-batch 1.
    return {
        "PERCEPTIO_RECIPE": "tiny_cpu", "PERCEPTIO_PROCS_PER_NODE": str(procs_per_node), "PERCEPTIO_VENV": str(VENV),
        "PERCEPTIO_ROOT": str(ROOT), "PERCEPTIO_RUN_DIR": str(run_dir), "PERCEPTIO_RDZV_PORT": str(free_port()),
        "PERCEPTIO_OVERRIDES": " ".join([
            f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.micro_batch_size=1", "train.grad_accum_steps=2",
            "checkpoint.save_every_steps=3", "logging.log_samples=true", f"data.shards={shards}", NO_TOKENIZER,
            "logging.wandb=disabled", "logging.progress_bar=false", *extra]),
    }


def _job(nodes: int, log: Path) -> list[str]:
    return ["--gres=none", f"--nodes={nodes}", "--cpus-per-task=2", "--mem=3G", "--time=00:20:00", f"--output={log}"]


def _completed(cluster: dict, job: str, log: Path, timeout: float = 600, on_pending=None) -> None:
    state = _wait_for_state(cluster["env"], job, ENDED, timeout, on_pending=on_pending)
    assert state == "COMPLETED", log.read_text()[-5000:] if log.exists() else state
    return state


def _skip_requeue_delay(cluster: dict, job: str):
    """SLURM holds a requeued job for about two minutes; the tests shorten that to a few seconds (not to zero:
    slurmd refuses a credential from the same second as the old one's revocation)."""
    seen: list[float] = []

    def hook():
        if _job_field(cluster["env"], job, "Reason") != "BeginTime":
            return
        seen.append(time.time())
        if time.time() - seen[0] > 3:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster["env"],
                           capture_output=True)
    return hook


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _assert_equal_runs(got: Path, reference: Path) -> None:
    assert sorted(losses(got)) == list(range(1, STEPS + 1))
    assert losses(got) == losses(reference)
    assert step_keys(got) == step_keys(reference)


# ------------------------------------------------------------------------------------------------ default suite


def test_every_srun_of_the_scripts_names_the_tasks_cpus():
    """Since SLURM 22.05 a step does not inherit the job's --cpus-per-task: each srun must say it (the smoke test
    below shows what a task gets without it)."""
    for script in ("slurm/train_8b.sh", "slurm/eval.sh", "slurm/preprocess_ray.sh"):
        text = (ROOT / script).read_text()
        commands = re.findall(r"^\s*srun\b(?:[^\n]*\\\n)*[^\n]*", text, flags=re.MULTILINE)
        assert commands, script
        for command in commands:
            assert "--cpus-per-task=" in command, (script, command)


def test_two_nodes_rendezvous_by_node_address_and_each_task_gets_the_jobs_cpus(cluster, tmp_path, tiny_shards):
    env = cluster["env"]
    # What a step's task gets: the node binds tasks to cores, as sites do; without --cpus-per-task, one core.
    wrap = ("srun --nodes=2 --ntasks-per-node=1 bash -c 'echo plain $(nproc)'; srun --nodes=2 --ntasks-per-node=1 "
            "--cpus-per-task=$SLURM_CPUS_PER_TASK bash -c 'echo explicit $(nproc)'")
    submitted = subprocess.run(["sbatch", "--parsable", *_job(2, tmp_path / "probe.out"), "--wrap", wrap], env=env,
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    probe = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "run"
    log = tmp_path / "train.out"
    job = _sbatch(env, "slurm/train_8b.sh", _job(2, log), _train_env(run_dir, tiny_shards, 1, "train.max_steps=2", "train.warmup_steps=1"))
    _completed(cluster, probe, tmp_path / "probe.out", timeout=60)
    assert sorted((tmp_path / "probe.out").read_text().split("\n")) == ["", "explicit 2", "explicit 2",
                                                                          "plain 1", "plain 1"]
    _completed(cluster, job, log, timeout=120)
    text = log.read_text()
    assert f"rendezvous at {NODES['n1']}:" in text, text[-3000:]
    for index, (node, addr) in enumerate(NODES.items()):
        assert f"[on_node.sh] node {index} {node} ({addr}): 2 CPUs for this task" in text, text[-3000:]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run_dir / "samples").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
