"""The path a cluster user follows, checked cheaply: the 8B recipes agree with each other, the SLURM scripts write
where SLURM can open and continue where a resubmission looks, one command language, and user errors that end in
one paragraph (the launcher included) instead of a traceback. The whole path runs in tests/test_rehearsal.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perceptio_dist.config import load_typed_config
from perceptio_dist.config.training import load_config
from perceptio_dist.preprocess.config import PreprocessConfig, load_preprocess_config
from perceptio_dist.train.vqvae_config import VQVAETrainConfig

from .conftest import ROOT

SCRIPTS = ["slurm/train_8b.sh", "slurm/eval.sh", "slurm/preprocess_ray.sh"]
TRAINING_8B = ["perceptio_8b", "perceptio_8b_lora", "perceptio_8b_pipeline"]


@pytest.fixture
def cluster_env(monkeypatch):
    monkeypatch.setenv("PERCEPTIO_WEIGHTS", "/cluster/weights")
    monkeypatch.setenv("PERCEPTIO_DATA", "/cluster/data")


def test_the_8b_recipes_read_what_the_step_before_writes(cluster_env):
    teacher = load_preprocess_config("preprocess_8b_teacher")
    tokenizer = load_typed_config(VQVAETrainConfig, "vqvae_8b", kind="vqvae")
    codes = load_preprocess_config("preprocess_8b_codes")
    # teacher pass -> tokenizer -> code pass -> training: no circle
    assert not teacher.depth_codes and teacher.from_shards is None
    assert tokenizer.data.shards == teacher.output_dir == codes.from_shards
    tokenizer_file = str(Path(tokenizer.output_dir) / "tokenizer.safetensors")
    assert codes.depth_vqvae.checkpoint == tokenizer_file
    for name in TRAINING_8B:
        cfg = load_config(name)
        assert cfg.data.shards == codes.output_dir, name
        assert cfg.model.depth_vqvae.checkpoint == tokenizer_file, name
        geometry = (cfg.model.tokens.num_depth_codes, cfg.model.tokens.depth_grid, cfg.model.depth_vqvae.input_size)
        for other in (codes, teacher):
            assert geometry == (other.tokens.num_depth_codes, other.tokens.depth_grid, other.depth_vqvae.input_size)
        assert geometry == (tokenizer.tokens.num_depth_codes, tokenizer.tokens.depth_grid,
                            tokenizer.depth_vqvae.input_size)
        arch = {k: v for k, v in vars(cfg.model.depth_vqvae).items() if k not in ("checkpoint", "ema_decay")}
        assert arch == {k: v for k, v in vars(tokenizer.depth_vqvae).items() if k not in ("checkpoint", "ema_decay")}
        assert arch == {k: v for k, v in vars(codes.depth_vqvae).items() if k not in ("checkpoint", "ema_decay")}


def test_every_shipped_recipe_loads(cluster_env):
    from perceptio_dist.config import recipe_names

    for name in recipe_names():
        load_config(name)
    for name in recipe_names("preprocess"):
        assert isinstance(load_preprocess_config(name), PreprocessConfig)
    for name in recipe_names("vqvae"):
        load_typed_config(VQVAETrainConfig, name, kind="vqvae")


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_output_names_no_folder_slurm_cannot_open(script):
    """SLURM opens --output before the script runs and creates no folder: a relative path must be a bare file
    name (the submit directory), whatever directory the user submits from."""
    outputs = re.findall(r"^#SBATCH --output=(\S+)", (ROOT / script).read_text(), re.MULTILINE)
    assert outputs and all(os.path.dirname(o) == "" for o in outputs), outputs


def test_a_resubmitted_training_job_finds_the_run_folder_of_the_first(tmp_path):
    """The run folder follows from the job name, not the job id: a job resubmitted by hand resumes."""
    line = next(l for l in (ROOT / "slurm/train_8b.sh").read_text().splitlines() if l.startswith("PERCEPTIO_RUN_DIR="))

    def run_dir(job_id: str, name: str = "perceptio-8b") -> str:
        env = {"PATH": os.environ["PATH"], "PERCEPTIO_ROOT": str(tmp_path), "SLURM_JOB_ID": job_id,
               "SLURM_JOB_NAME": name}
        return subprocess.run(["bash", "-c", f"{line}\necho \"$PERCEPTIO_RUN_DIR\""], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert run_dir("101") == run_dir("202") == str(tmp_path / "runs" / "perceptio-8b")
    assert run_dir("303", "perceptio-8b-v2") != run_dir("101")


@pytest.mark.parametrize("command,default", [
    (["perceptio-train"], "tiny_cpu"), (["perceptio-config"], "tiny_cpu"), (["perceptio-model-info"], "tiny_cpu"),
    (["perceptio-plan"], "perceptio_8b"), (["perceptio-preprocess"], "preprocess_tiny"),
    (["perceptio-vqvae", "train"], "vqvae_tiny"), (["perceptio-vqvae", "ablate"], "vqvae_report"),
])
def test_every_recipe_command_spells_the_flag_alike_and_names_its_default(command, default, tmp_path):
    """--recipe everywhere (--config kept as an alias); run from another directory, as `ray job submit` would."""
    binary = Path(sys.executable).parent / command[0]
    proc = subprocess.run([str(binary), *command[1:], "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text = " ".join(proc.stdout.split())
    assert "--recipe RECIPE, --config RECIPE" in help_text and f"(default: {default})" in help_text


def test_explain_into_a_closed_pipe_exits_cleanly():
    """`perceptio-config --explain | head`: the reader closed before the first write, every time."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([str(Path(sys.executable).parent / "perceptio-config"), "--explain"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_a_changed_global_batch_or_seed_is_one_paragraph(tiny_cfg, tiny_tokenizer):
    from perceptio_dist.config import ConfigError
    from perceptio_dist.data.training_data import build_loader

    loader = build_loader(tiny_cfg, tiny_tokenizer, _ids(tiny_cfg, tiny_tokenizer), 0, 1)
    state = {**loader.state_dict(), "seed": 7, "num_slots": loader.num_slots + 2}
    with pytest.raises(ConfigError) as error:
        loader.load_state_dict(state)
    message = str(error.value)
    assert "data.seed was 7, now 1234" in message and f"was {loader.num_slots + 2}, now {loader.num_slots}" in message
    assert "\n" not in message and "logging.output_dir" in message


def _ids(cfg, tokenizer):
    from perceptio_dist.model.spatial_tokens import add_spatial_tokens

    return add_spatial_tokens(tokenizer, cfg.model.tokens)


# ------------------------------------------------------------------ the launcher: user errors vs real crashes

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from perceptio_dist.cli import config_error_exit
    from perceptio_dist.cli.train import redirect_rank_stderr
    from perceptio_dist.config import ConfigError

    redirect_rank_stderr()
    if sys.argv[1] == "user-one-rank" and os.environ["RANK"] == "0":
        time.sleep(120)  # waits in a collective for rank 1, which stops: torchrun then ends it with SIGTERM
    if sys.argv[1].startswith("user"):  # found on every rank, as a damaged shard both ranks read
        error = ConfigError("Config error at 'data.shards': shard x.tar is damaged (the one paragraph).")
        error.every_rank = True
        config_error_exit(error)
    if os.environ["RANK"] == "1":
        raise RuntimeError("a real crash on rank 1")
""")


@pytest.mark.parametrize("case", ["user", "user-one-rank", "crash"])
def test_the_launcher_reports_user_errors_once_and_real_crashes_in_full(case, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    driver = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from perceptio_dist.cli.train import launch_ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               {str(script)!r}, {case!r}]
        sys.exit(launch_ranks(cmd, Path({str(tmp_path)!r})))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**env, "OMP_NUM_THREADS": "1"})
    if case.startswith("user"):
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.count("(the one paragraph)") == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "a real crash on rank 1" in proc.stderr and "ChildFailedError" in proc.stderr
        assert re.search(r"rank\s*:\s*1", proc.stderr) and re.search(r"exitcode\s*:\s*1", proc.stderr)
