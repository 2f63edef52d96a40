"""Shared fixtures: tiny configs, a tiny tokenizer, and a launcher for multi-rank runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The tiny recipe expects a trained depth tokenizer (runs/tiny_data/depth_vqvae); tests use random ones.
NO_TOKENIZER = "model.depth_vqvae.checkpoint=null"
os.environ.setdefault("WANDB_MODE", "disabled")  # tests opt into offline wandb explicitly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when it is first imported (DeepSpeed imports it too), so it is set before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")


# What a shell inside an interactive allocation (salloc) on a cluster looks like: an outer SLURM job with other
# tasks, one thread per process, no visible GPU. None of it describes the run perceptio-train starts.
CLUSTER_SHELL = {
    "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242",
    "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_NNODES": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NODELIST": "node[01-02]",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_CPUS_ON_NODE": "1", "SLURM_STEP_ID": "0", "SLURM_SUBMIT_DIR": "/tmp",
}


_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                       "MASTER_PORT")


def without_launcher_variables(env: dict) -> dict:
    """A copy of ``env`` for a subprocess that must start its own process group."""
    return {k: v for k, v in env.items() if k not in _LAUNCHER_VARIABLES}


@contextlib.contextmanager
def launcher_variables_restored():
    """For in-process training inside module/session fixtures (the autouse fixture below covers tests)."""
    saved = {k: os.environ.get(k) for k in _LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs join a one-rank process group and set RANK/MASTER_PORT; a later subprocess that
    inherited them would think it was already launched by torchrun (and reuse a bound port)."""
    with launcher_variables_restored():
        yield


def run_process(cmd: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` in a session of its own, so that a
    timeout (or an interrupted suite) kills the whole process group: torchrun's ranks and a private Ray's workers
    too, which would otherwise outlive the test, hold their memory and keep running for the rest of the suite."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **popen) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a daemon that left the group still holds the pipes
                proc.kill()
                stdout, stderr = "", ""
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def make_shards(folder: Path, num_scenes: int, shard_size: int, *overrides: str) -> Path:
    """Render scenes and preprocess them into shards with the real job (a private local Ray instance)."""
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    write_scenes(folder / "scenes", num_scenes, progress=False)
    proc = run_process(
        [sys.executable, "-m", "ray_jobs.preprocess", "--config", "preprocess_tiny",
         f"sources.0.path={folder / 'scenes'}", f"output_dir={folder / 'shards'}", f"shard_size={shard_size}",
         "depth_vqvae.checkpoint=null", *overrides],
        timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder / "shards"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """40 rendered scenes (about 190 samples of all four tasks) in shards of 8, shared by the session."""
    return make_shards(tmp_path_factory.mktemp("tiny_data"), 40, 8)


@pytest.fixture
def tiny_cfg(tmp_path, tiny_shards):
    from perceptio_dist.config.training import load_config

    return load_config("tiny_cpu", [f"logging.output_dir={tmp_path / 'run'}", "logging.wandb=disabled",
                                    f"data.shards={tiny_shards}", NO_TOKENIZER])


@pytest.fixture
def tiny_tokenizer(tiny_cfg):
    from perceptio_dist.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_cfg.model.backbone)


def run_ranks(nproc: int, args: list[str], timeout: float, cwd: Path = ROOT, module: str | None = "perceptio_dist.train",
              script: str | None = None) -> subprocess.CompletedProcess:
    """Run ``nproc`` local ranks with torchrun; a hang fails the test through ``timeout``."""
    target = ["-m", module] if script is None else [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    env = {**without_launcher_variables(dict(os.environ)), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    try:
        proc = run_process(cmd, timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{nproc}-rank run did not finish within {timeout}s (hang?)\n{(exc.stdout or '')[-3000:]}"
                    f"\n{(exc.stderr or '')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{nproc}-rank run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def save_initial_backbone(folder: Path, shards: Path) -> Path:
    """The tiny recipe's random backbone and tokenizer saved as a checkpoint folder: the common start of runs on
    different rank counts (random init under ZeRO-3's zero.Init depends on the rank count)."""
    import torch

    from perceptio_dist.config.training import load_config
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.tokenizer import load_tokenizer

    cfg = load_config("tiny_cpu", [f"data.shards={shards}", NO_TOKENIZER])
    tokenizer = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    build_perceptio(cfg.model, tokenizer).backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def start_from_checkpoint(source_run: Path, step: int, run_dir: Path) -> Path:
    """``run_dir`` holding a copy of ``source_run``'s checkpoint of ``step`` as its latest, to resume from."""
    import shutil

    from perceptio_dist.train.checkpoint import tag_for

    shutil.copytree(source_run / "checkpoints" / tag_for(step), run_dir / "checkpoints" / tag_for(step))
    (run_dir / "checkpoints" / "latest").write_text(tag_for(step))
    return run_dir


def assert_steps_repeat_bit_for_bit(reference_run: Path, resumed_run: Path, steps: list[int]) -> None:
    """The resumed run logged exactly ``steps``, each with the reference run's loss, bit for bit."""
    want = {m["step"]: m["loss"] for m in read_metrics(reference_run)}
    got = {m["step"]: m["loss"] for m in read_metrics(resumed_run)}
    assert sorted(got) == steps
    for step in steps:
        assert got[step] == want[step], step


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pytest_collection_modifyitems(config, items):
    """Mark the fast tier (tests/fast_tier.py says which tests and why)."""
    from .fast_tier import is_fast

    for item in items:
        if is_fast(item.path.name, getattr(item, "originalname", item.name)) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.fast)


def tools_module(name: str):
    """A script of tools/ imported as a module (tools/ is not a package); ``name`` may name a subfolder (toy/...)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("/", "."), ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overridden(cfg, *overrides: str):
    """``cfg`` with dotted overrides applied as a recipe's are (they may name an experiment's field)."""
    from perceptio_dist.config.recipes import apply_override
    from perceptio_dist.config.training import config_from_dict

    data = cfg.to_dict()
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)
