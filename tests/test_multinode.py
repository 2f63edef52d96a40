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
from .test_slurm import VENV, _job_field, _sbatch, _wait_for_state, local_cluster

NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
SLURMD_TIMEOUT = 10  # seconds an unresponsive node stays up before SLURM marks it down and requeues its jobs
COLLECTIVE_TIMEOUT_MINUTES = 0.25  # 15 s: how long a rank waits for a frozen peer
STEPS = 12
RAY_FOLDERS: list[str] = []  # the jobs' Ray session folders, removed with the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private two-node cluster, two CPUs per node, stopped after the module; it must leave no daemon and no
    shared memory behind."""
    state = tmp_path_factory.mktemp("slurm2")
    shm_before = set(os.listdir("/dev/shm"))
    with local_cluster(state, "--nodes", "2", "--slurmd-timeout", str(SLURMD_TIMEOUT),
                       LOCAL_SLURM_CPUS_PER_NODE="2") as client:
        try:
            yield {"env": client, "dir": state}
        finally:
            for folder in RAY_FOLDERS:
                shutil.rmtree(folder, ignore_errors=True)
    assert not _daemons(state), "local_slurm.sh stop left daemons running"
    leaked = set(os.listdir("/dev/shm")) - shm_before
    assert not leaked, f"shared memory left behind: {sorted(leaked)}"


def _daemons(state: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if str(state / "slurm.conf") in " ".join(p.info["cmdline"] or [])]


def _environ(process: psutil.Process) -> dict:
    try:
        return process.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return {}


def _job_processes(job: str, node: str | None = None) -> list[psutil.Process]:
    """The processes of a job's steps (not its batch script), on one node or all, found by their SLURM variables."""
    found = []
    for p in psutil.process_iter():
        env = _environ(p)
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


def test_the_training_script_uses_the_trainers_statuses_and_markers():
    """train_8b.sh repeats three values of the Python side in shell: they must not drift apart."""
    from perceptio_dist.train.peer_loss import PEER_LOST_MARKER
    from perceptio_dist.train.signals import REQUEUE_EXIT_CODE, REQUEUE_MARKER

    script = (ROOT / "slurm" / "train_8b.sh").read_text()
    values = dict(re.findall(r"^(REQUEUE_EXIT_CODE|REQUEUE_MARKER|PEER_LOST_MARKER)=(\S+)", script, re.MULTILINE))
    assert values == {"REQUEUE_EXIT_CODE": str(REQUEUE_EXIT_CODE), "REQUEUE_MARKER": REQUEUE_MARKER,
                      "PEER_LOST_MARKER": PEER_LOST_MARKER}


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


# ------------------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, tiny_shards) -> Path:
    """One node, two ranks: the run every other layout and every interrupted run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = run_dir.parent / "reference.out"
    job = _sbatch(cluster["env"], "slurm/train_8b.sh", _job(1, log), _train_env(run_dir, tiny_shards, 2))
    _completed(cluster, job, log)
    return run_dir


def _stop_with_usr1_and_cancel(cluster: dict, job: str, run_dir: Path, after_steps: int) -> None:
    """Preempt a running job (checkpoint, requeue), then cancel the requeued job: the run continues elsewhere."""
    env = cluster["env"]
    _wait_until(lambda: _steps_logged(run_dir) >= after_steps, 300, "the job did not start training")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    assert _wait_for_state(env, job, {"PENDING"} | ENDED, 300) == "PENDING"
    subprocess.run(["scancel", job], env=env, check=True)
    _wait_for_state(env, job, ENDED, 60)


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_a_checkpoint_moves_between_node_counts(cluster, reference, tmp_path,
                                                                             tiny_shards):
    env = cluster["env"]
    two = tmp_path / "two_nodes"
    job = _sbatch(env, "slurm/train_8b.sh", _job(2, tmp_path / "two.out"), _train_env(two, tiny_shards, 1))
    _completed(cluster, job, tmp_path / "two.out")
    _assert_equal_runs(two, reference)

    for first, second in ((2, 1), (1, 2)):  # nodes before and after; two ranks in all either way
        run_dir = tmp_path / f"{first}_then_{second}_nodes"
        job = _sbatch(env, "slurm/train_8b.sh", _job(first, tmp_path / f"{first}{second}a.out"),
                      _train_env(run_dir, tiny_shards, 2 // first))
        _stop_with_usr1_and_cancel(cluster, job, run_dir, after_steps=4)
        saved = read_marker(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip())
        assert saved["world_size"] == 2 and 4 <= saved["step"] < STEPS, saved
        log = tmp_path / f"{first}{second}b.out"
        job = _sbatch(env, "slurm/train_8b.sh", _job(second, log), _train_env(run_dir, tiny_shards, 2 // second))
        _completed(cluster, job, log)
        assert f"at step {saved['step']}" in log.read_text(), log.read_text()[-3000:]
        _assert_equal_runs(run_dir, reference)


def _kill_node(cluster: dict, node: str, job: str) -> None:
    """The node dies: its slurmd, the job's step daemons on it and every process of the job there, with SIGKILL."""
    victims = _job_processes(job, node)
    daemons = {v.parent() for v in victims if v.parent() is not None and v.parent().name().startswith("slurmstepd")}
    os.kill(int((cluster["dir"] / "run" / f"slurmd-{node}.pid").read_text()), signal.SIGKILL)
    for process in [*daemons, *victims]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_node_lost_mid_run_ends_the_survivor_quickly_and_the_run_resumes_exactly(how, cluster, reference, tmp_path,
                                                                                   tiny_shards):
    """(killed) n2's slurmd and job processes get SIGKILL: sockets close, the survivor fails at once, SLURM marks
    n2 down after SlurmdTimeout and requeues the job, which runs again once n2 is back. (frozen) n2's job processes
    get SIGSTOP: nothing closes, the survivor gives up after parallel.timeout_minutes, the script requeues."""
    env, conf = cluster["env"], cluster["dir"] / "slurm.conf"
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(env, "slurm/train_8b.sh", _job(2, log), _train_env(
        run_dir, tiny_shards, 1, f"parallel.timeout_minutes={COLLECTIVE_TIMEOUT_MINUTES}"))
    _wait_until(lambda: _steps_logged(run_dir) >= 5, 300, "the job did not start training")
    survivor = [p for p in _job_processes(job, "n1") if "perceptio_dist.train" in " ".join(p.cmdline())]
    assert survivor
    lost_at = time.time()
    if how == "killed":
        _kill_node(cluster, "n2", job)
    else:
        for process in _job_processes(job, "n2"):
            process.suspend()
    bound = 20 if how == "killed" else COLLECTIVE_TIMEOUT_MINUTES * 60 + 30
    _, alive = psutil.wait_procs(survivor, timeout=bound)
    survivor_seconds = time.time() - lost_at
    assert not alive, f"the surviving rank still runs {bound:.0f} s after the node was {how}"
    steps_before = _steps_logged(run_dir)

    # Nothing half-written is published: `latest` names a complete checkpoint (its marker is written last).
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert read_marker(run_dir / "checkpoints" / latest)["step"] < STEPS

    # The job is requeued: by SLURM once the dead node is marked down, by the script after a hang.
    assert _wait_for_state(env, job, {"PENDING"} | ENDED, SLURMD_TIMEOUT * 10 + 120) == "PENDING", \
        log.read_text()[-4000:]
    requeued_at = time.time()
    if how == "killed":
        node = subprocess.run(["sinfo", "-h", "-n", "n2", "-o", "%T"], env=env, capture_output=True, text=True)
        assert node.stdout.strip().startswith("down"), node.stdout
        subprocess.run(["slurmd", "-f", str(conf), "-N", "n2"], env=env, check=True)  # the node comes back
    skip_delay = _skip_requeue_delay(cluster, job)
    state = _wait_for_state(env, job, {"RUNNING"} | ENDED, 300, on_pending=skip_delay)
    assert state == "RUNNING", log.read_text()[-4000:]
    restarted_at = time.time()
    _wait_until(lambda: _steps_logged(run_dir) > steps_before, 300, "no step after the restart", poll=0.2)
    first_step_at = time.time()
    _completed(cluster, job, log)

    text = log.read_text()
    assert int(_job_field(env, job, "Restarts")) == 1
    assert "resumed from" in text and "start 1 on n[1-2]" in text, text[-4000:]
    # The survivor says what happened in one paragraph, no traceback; the script requeued the job (frozen) or
    # SLURM did, the node being down (killed; the script may have been first).
    assert "rank 0 on n1: a peer rank stopped answering" in text, text[-6000:]
    if how == "frozen":
        assert "[train_8b.sh] a node was lost (status" in text, text[-6000:]
    _assert_equal_runs(run_dir, reference)
    _wait_until(lambda: not _job_processes(job), 60, "processes of the job are left")
    print(f"\nnode {how}: survivor exited {survivor_seconds:.1f} s after the loss; job requeued "
          f"{requeued_at - lost_at:.1f} s after the loss; requeue to first new step "
          f"{first_step_at - requeued_at:.1f} s (SLURM's requeue delay cut to 3 s), restart to first new step "
          f"{first_step_at - restarted_at:.1f} s")


@pytest.mark.slow
def test_evaluation_on_two_nodes_equals_one_node(cluster, reference, tmp_path):
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    write_scenes(tmp_path / "scenes", 2, seed=50_000, progress=False)
    reports = {}
    for nodes in (1, 2):
        out, log = tmp_path / f"eval_{nodes}", tmp_path / f"eval_{nodes}.out"
        job = _sbatch(cluster["env"], "slurm/eval.sh", _job(nodes, log), {
            "PERCEPTIO_MODEL": str(reference / "checkpoints"), "PERCEPTIO_EVAL_OUT": str(out),
            "PERCEPTIO_PROCS_PER_NODE": str(2 // nodes), "PERCEPTIO_VENV": str(VENV), "PERCEPTIO_ROOT": str(ROOT),
            "PERCEPTIO_RDZV_PORT": str(free_port()),
            "PERCEPTIO_EVAL_ARGS": f"--synthetic-scenes {tmp_path / 'scenes'} --limit 2 --max-new-tokens 24 "
                                   "--batch-size 3"})
        _completed(cluster, job, log)
        reports[nodes] = {name: (out / name).read_text() for name in ("metrics.json", "predictions.jsonl")}
    assert reports[1] == reports[2]
    assert "synthetic_refer" in json.loads(reports[1]["metrics.json"])


def _preprocess(cluster: dict, tmp_path: Path, nodes: int, scenes: Path, out: Path, name: str) -> tuple[str, Path]:
    from .test_slurm import _preprocess_config

    config = _preprocess_config(tmp_path / f"{name}.yaml", scenes, out)
    # Two decode tasks and two teacher actors: enough to keep both nodes busy, and each fits one node's 2 CPUs.
    config.write_text(config.read_text().replace("decode_concurrency: 1", "decode_concurrency: 2")
                      .replace("  concurrency: 1", "  concurrency: 2"))
    log = tmp_path / f"{name}.out"
    agent = free_port()
    RAY_FOLDERS.append(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths stay under 108 bytes
    job = _sbatch(cluster["env"], "slurm/preprocess_ray.sh", _job(nodes, log), {
        "PERCEPTIO_RECIPE": str(config), "PERCEPTIO_VENV": str(VENV), "PERCEPTIO_ROOT": str(ROOT),
        "PERCEPTIO_RAY_PORT": str(free_port()), "PERCEPTIO_RAY_DASHBOARD_PORT": str(free_port()),
        "PERCEPTIO_RAY_CLIENT_PORT": str(free_port()), "PERCEPTIO_RAY_AGENT_PORT": str(agent),
        # Ray's logical CPUs: a node holds the whole pipeline (2 decode tasks, 2 teachers and the tokenizer: 3.5),
        # so a survivor can finish alone.
        "PERCEPTIO_RAY_CPUS_PER_NODE": "4",
        "PERCEPTIO_RAY_TMP": RAY_FOLDERS[-1],
    })
    return job, log


def _source_records(recipe: Path) -> int:
    """How many records the recipe's sources hold: what the shards and the quarantine must account for, once each."""
    from perceptio_dist.preprocess.config import load_preprocess_config
    from perceptio_dist.preprocess.sources import iter_source

    return sum(1 for source in load_preprocess_config(str(recipe)).sources for _ in iter_source(source))


def _shards(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


@pytest.fixture
def bystander_ray(tmp_path):
    """Another user's Ray on the same machine, which the job's clean-up must leave alone. Started as the script
    starts its nodes (`ray start --block`) and stopped the same way: SIGTERM to that command."""
    temp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
    # Every process of this Ray inherits the variable: how the checks find them all (some rename themselves).
    env = {**without_launcher_variables(dict(os.environ)), "RAY_USAGE_STATS_ENABLED": "0", "BYSTANDER_RAY": temp}
    head = subprocess.Popen(
        [str(VENV / "bin" / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def processes(name: str = "") -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if _environ(process).get("BYSTANDER_RAY") == temp and process.status() != psutil.STATUS_ZOMBIE \
                        and name in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                pass
        return found

    try:
        raylets = _wait_until(lambda: processes("raylet"), 120, "the bystander Ray did not start")
        yield raylets
    finally:
        head.terminate()
        try:
            head.wait(60)
        finally:
            head.kill()
            shutil.rmtree(temp, ignore_errors=True)
    _wait_until(lambda: not processes(), 60, "the bystander Ray's processes outlived its `ray start --block`")


@pytest.mark.slow
def test_preprocessing_on_two_nodes_equals_one_node_and_survives_a_lost_worker_node(cluster, tmp_path, bystander_ray):
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    env = cluster["env"]
    scenes = tmp_path / "scenes"
    write_scenes(scenes, 48, progress=False)
    outputs = {}
    for nodes in (1, 2):
        out = tmp_path / f"shards_{nodes}"
        job, log = _preprocess(cluster, tmp_path, nodes, scenes, out, f"nodes{nodes}")
        _completed(cluster, job, log)
        assert f"all {nodes} node(s) joined" in log.read_text(), log.read_text()[-3000:]
        outputs[nodes] = out
    assert all(p.is_running() for p in bystander_ray), "the job's clean-up stopped another user's Ray"
    one, two = (_shards(outputs[n]) for n in (1, 2))
    assert one and one == two  # byte for byte
    manifest = json.loads((outputs[2] / "manifest.json").read_text())
    per_node = manifest["records_per_node"]
    assert set(per_node["decode"]) == set(NODES.values()), per_node  # work ran on both nodes
    assert sum(per_node["decode"].values()) == manifest["num_samples"] + manifest["quarantined"] \
        == _source_records(tmp_path / "nodes2.yaml")
    print(f"\ntwo-node preprocessing, records per node: {json.dumps(per_node)}")

    # A worker node lost mid-job: every Ray process of the job on n2 killed once the first shard is written.
    out = tmp_path / "shards_lost_node"
    job, log = _preprocess(cluster, tmp_path, 2, scenes, out, "lost")
    _wait_until(lambda: any(out.rglob("*.tar")) and _job_processes(job, "n2"), 300, "no shard written")
    victims = _job_processes(job, "n2")
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    written_before = len(list(out.rglob("*.tar")))
    assert written_before < len(one), "the job ended before the node was killed: nothing was tested"
    state = _wait_for_state(env, job, ENDED, 600)
    outcome = "completed" if state == "COMPLETED" else "failed, rerun"
    if state != "COMPLETED":  # one paragraph, then a rerun writes only what is missing
        job, log = _preprocess(cluster, tmp_path, 2, scenes, out, "rerun")
        _completed(cluster, job, log)
    assert _shards(out) == one
    manifest = json.loads((out / "manifest.json").read_text())
    keys = [k for shard in manifest["shards"] for k in shard["keys"]]
    assert len(keys) == len(set(keys)) == manifest["num_samples"]
    assert manifest["num_samples"] + manifest["quarantined"] == _source_records(tmp_path / "lost.yaml")
    print(f"worker node killed mid-job ({len(victims)} processes, {written_before} of {len(one)} shards written): "
          f"{outcome}")
    _wait_until(lambda: not _job_processes(job), 60, "processes of the job are left")
