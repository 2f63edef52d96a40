"""The 8B path rehearsed as docs/train-8b.md writes it: every command block of the page, in order, on a local SLURM.

Step 1 (weights) is replaced by tiny random weights saved in the formats the page tells users to produce: an
HF-native InternVL folder with its tokenizer, a SAM2 checkpoint, a Depth Anything V2 folder. The data are small
files in the layouts the 8B recipes read (refer, COCO images, LLaVA, an image folder the teacher really runs on,
rendered scenes). Each step gets its shrink overlay from tests/rehearsal/ (sizes and resources only) and the
sbatch resources of a CPU node; nothing else of a command changes. The cheap checks of the same path (the page's
blocks parse into known steps, the overlays touch no path, the recipes agree) are in the default suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from perceptio_dist.parallel.distributed import free_port

from .conftest import ROOT, read_metrics
from .fixtures import make_image_folder, make_llava, make_refcoco, save_tiny_depth_anything
from .test_slurm import slurm  # noqa: F401  (a fixture)

PAGE = ROOT / "docs" / "train-8b.md"
OVERLAYS = ROOT / "tests" / "rehearsal"
VENV = Path(sys.executable).parent.parent
CPU_NODE = ["--gres=none", "--nodes=1", "--cpus-per-task=2", "--mem=6G", "--time=00:30:00"]
SKIP_MARK = "<!-- rehearsal: skip"


def page_steps(text: str | None = None) -> list[str]:
    """The page's shell commands, in order: every line of every ```bash block (continuations joined), except
    blocks marked to skip and the set-up lines (export, source), whose values the rehearsal provides."""
    text = PAGE.read_text() if text is None else text
    commands = []
    for match in re.finditer(r"(?P<before>[^\n]*)\n```bash\n(?P<body>.*?)```", text, re.DOTALL):
        if match.group("before").startswith(SKIP_MARK):
            continue
        for line in match.group("body").replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "export ", "source ", "./run_tests.sh")):
                commands.append(line)
    return commands


def kind_of(command: str) -> str:
    """Which step a command is, by its program (and script): each kind has its own shrink."""
    words = shlex.split(command)
    program = next(w for w in words if "=" not in w)
    if program == "sbatch":
        return "sbatch " + words[-1]
    if program == "torchrun":
        return "torchrun " + words[words.index("-m") + 1] + " " + words[words.index("-m") + 2]
    return program


KNOWN_KINDS = {"perceptio-scenes", "sbatch slurm/preprocess_ray.sh", "torchrun perceptio_dist.cli.vqvae train",
               "sbatch slurm/train_8b.sh", "sbatch slurm/eval.sh", "perceptio-export"}


def shrink(command: str, extra_env: dict) -> tuple[str, dict]:
    """A page command at toy size: the step's overlay, a CPU node's resources, smaller counts."""
    kind = kind_of(command)
    env = dict(extra_env)
    if kind == "perceptio-scenes":
        return re.sub(r"--num \d+", "--num 6", command), env
    if kind == "torchrun perceptio_dist.cli.vqvae train":
        return (command.replace("--nproc-per-node 8", "--nproc-per-node 1")
                + f" {OVERLAYS / 'vqvae.yaml'}"), env
    if kind.startswith("sbatch "):
        script = kind.split()[1]
        overlay = {"slurm/preprocess_ray.sh": "preprocess.yaml", "slurm/train_8b.sh": "train.yaml"}.get(script)
        if overlay:
            env["PERCEPTIO_OVERRIDES"] = str(OVERLAYS / overlay)
        env.update({"PERCEPTIO_PROCS_PER_NODE": "2" if script == "slurm/train_8b.sh" else "1",
                    "PERCEPTIO_GPUS_PER_NODE": "0"})
        command = command.replace(
            "sbatch ", f"sbatch --wait {' '.join(CPU_NODE)} ", 1)
        # evaluation: a few items, short answers (sizes); the benchmark the page names stays
        command = command.replace('PERCEPTIO_EVAL_ARGS="', 'PERCEPTIO_EVAL_ARGS="--limit 2 --max-new-tokens 8 ', 1)
        return command, env
    return command, env


def test_the_page_is_made_of_known_steps_in_order():
    kinds = [kind_of(c) for c in page_steps()]
    assert set(kinds) <= KNOWN_KINDS, set(kinds) - KNOWN_KINDS
    assert kinds == ["perceptio-scenes", "sbatch slurm/preprocess_ray.sh", "torchrun perceptio_dist.cli.vqvae train",
                     "sbatch slurm/preprocess_ray.sh", "sbatch slurm/train_8b.sh", "sbatch slurm/train_8b.sh",
                     "sbatch slurm/eval.sh", "perceptio-export"]


@pytest.mark.parametrize("recipe,kind,overlay", [
    ("perceptio_8b", "", "train.yaml"), ("vqvae_8b", "vqvae", "vqvae.yaml"),
    ("preprocess_8b_teacher", "preprocess", "preprocess.yaml"), ("preprocess_8b_codes", "preprocess", "preprocess.yaml"),
])
def test_each_shrink_overlay_loads_and_changes_no_path(recipe, kind, overlay, monkeypatch):
    from perceptio_dist.config import load_typed_config, path_fields
    from perceptio_dist.cli.config import CONFIG_KINDS

    monkeypatch.setenv("PERCEPTIO_WEIGHTS", "/w")
    monkeypatch.setenv("PERCEPTIO_DATA", "/d")
    cls, _, _ = CONFIG_KINDS[kind or "train"]()
    shipped = load_typed_config(cls, recipe, [], kind=kind)
    shrunk = load_typed_config(cls, recipe, [str(OVERLAYS / overlay)], kind=kind)
    # SAM2's architecture is named by a config file: Hiera-L -> the tiny one is the image encoder's size.
    size_not_path = {"model.seg_head.sam2_config"}
    paths = {d: getattr(o, n) for o, n, d, _ in path_fields(shipped) if d not in size_not_path}
    assert paths == {d: getattr(o, n) for o, n, d, _ in path_fields(shrunk) if d not in size_not_path}
    assert shipped != shrunk


# ------------------------------------------------------------------------------------------ the rehearsal


def _save_weights(weights: Path) -> None:
    """Step 1 at toy size: each model saved in the format the page tells users to produce."""
    import torch

    from perceptio_dist.config.training import load_config
    from perceptio_dist.model.perceptio import build_perceptio
    from perceptio_dist.model.seg_head import build_sam2
    from perceptio_dist.model.tokenizer import load_tokenizer

    cfg = load_config("perceptio_8b", [str(OVERLAYS / "train.yaml"), "model.backbone.pretrained_path=null",
                                       "model.backbone.tokenizer=builtin:tiny_bpe", "model.depth_vqvae.checkpoint=null",
                                       "model.seg_head.sam2_checkpoint=null", "data.shards=/nowhere"])
    tokenizer = load_tokenizer(cfg.model.backbone)
    torch.manual_seed(0)
    internvl = weights / "InternVL2_5-8B-hf"
    build_perceptio(cfg.model, tokenizer).backbone.save_pretrained(internvl)
    tokenizer.save_pretrained(internvl)
    torch.save({"model": build_sam2("sam2_tiny").state_dict()}, weights / "sam2.1_hiera_large.pt")
    save_tiny_depth_anything(weights / "Depth-Anything-V2-Large-hf")


def _write_sources(data: Path) -> None:
    """The raw sources of preprocess_8b_teacher, in its layouts."""
    from PIL import Image

    from perceptio_dist.preprocess.scenes.folders import write_scenes

    refer = make_refcoco(data / "refer_tmp")
    (data / "coco").mkdir(parents=True)
    shutil.move(refer / "images", data / "coco" / "train2014")
    (data / "refer").mkdir()
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        shutil.copytree(refer / "refcoco", data / "refer" / dataset)
        if split_by != "unc":
            (data / "refer" / dataset / "refs(unc).p").rename(data / "refer" / dataset / f"refs({split_by}).p")
    shutil.rmtree(refer)
    llava = make_llava(data / "llava" / "images")
    llava.rename(data / "llava" / "llava_v1_5_mix665k.json")
    # The image folder the teacher runs on: photographs stand-ins and rendered scenes' RGB, no depth with them.
    folder = make_image_folder(data / "ade20k" / "images" / "training")
    scenes = data / "held_out_scenes"
    write_scenes(scenes, 2, seed=900_000, progress=False)
    for i, scene in enumerate(sorted(p for p in scenes.iterdir() if p.is_dir())):
        Image.open(scene / "rgb.png").convert("RGB").save(folder / f"scene_{i}.jpg")
    shutil.rmtree(scenes)


def _newest_job(env: dict, name: str) -> str:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], env=env, capture_output=True, text=True).stdout
    return out.split()[0] if out.split() else ""


@pytest.mark.slow
def test_the_8b_path_runs_as_the_page_writes_it(slurm, tmp_path):  # noqa: F811
    started = time.time()
    weights, data = tmp_path / "weights", tmp_path / "data"
    weights.mkdir()
    _save_weights(weights)
    _write_sources(data)
    run_dir = ROOT / "runs" / "perceptio-8b"
    if run_dir.exists():
        pytest.skip(f"{run_dir} exists (a real run?): the rehearsal would resume it")
    env = {**slurm, "PERCEPTIO_WEIGHTS": str(weights), "PERCEPTIO_DATA": str(data), "PATH": f"{VENV / 'bin'}:"
           f"{os.environ['PATH']}", "PERCEPTIO_VENV": str(VENV), "PERCEPTIO_RDZV_PORT": str(free_port()),
           "PERCEPTIO_RAY_PORT": str(free_port()), "PERCEPTIO_RAY_DASHBOARD_PORT": str(free_port()),
           "PERCEPTIO_RAY_TMP": tempfile.mkdtemp(prefix="ray", dir="/tmp"), "OMP_NUM_THREADS": "1"}
    hardblink = ROOT.parent / "shared" / "data" / "hardblink"
    if hardblink.exists():  # evaluation data: linked for the evaluation step only, never copied
        (data / "hardblink").symlink_to(hardblink)
    outputs = sorted(ROOT.glob("perceptio-*.out"))
    commands = page_steps()
    train_submissions = 0
    timings = []
    try:
        for command in commands:
            shrunk, extra = shrink(command, {})
            kind = kind_of(command)
            step_start = time.time()
            if kind == "sbatch slurm/train_8b.sh" and train_submissions == 0:
                # The first submission crashes after its first checkpoint: cancelled, as a lost node would end it.
                train_submissions += 1
                proc = subprocess.Popen(["bash", "-c", shrunk], cwd=ROOT, env={**env, **extra},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                checkpoints = run_dir / "checkpoints"
                deadline = time.time() + 900
                while not _complete(checkpoints):
                    assert proc.poll() is None, proc.communicate()[0][-4000:]
                    assert time.time() < deadline, "no checkpoint within 900 s"
                    time.sleep(1)
                job = _newest_job(slurm, "perceptio-8b")
                subprocess.run(["scancel", job], env=slurm, check=True)
                proc.communicate(timeout=300)
                assert not (run_dir / "checkpoints" / "global_step00000006").exists()
                timings.append((kind + " (cancelled)", time.time() - step_start))
                continue
            proc = subprocess.run(["bash", "-c", shrunk], cwd=ROOT, env={**env, **extra}, capture_output=True,
                                  text=True, timeout=1500)
            logs = "".join(_readable(p) for p in sorted(set(ROOT.glob("perceptio-*.out")) - set(outputs)))
            assert proc.returncode == 0, f"{shrunk}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
            timings.append((kind, time.time() - step_start))

        # What each step left for the next, as the page says.
        teacher = json.loads((data / "shards" / "perceptio_v1_teacher" / "manifest.json").read_text())
        assert teacher["depth"]["codes"] is False and teacher["identities"]["teacher"].startswith("depth_anything:")
        teacher_depth = sum(n for source, n in teacher["counts"]["source"].items() if source.startswith("image_folder"))
        assert teacher_depth >= 5  # the teacher really ran: 3 photographs and 2 rendered scenes' images
        tokenizer_id = json.loads((weights / "depth_vqvae" / "tokenizer.json").read_text())["id"]
        codes = json.loads((data / "shards" / "perceptio_v1" / "manifest.json").read_text())
        assert codes["identities"]["depth_tokenizer"] == tokenizer_id
        assert codes["num_samples"] == teacher["num_samples"]
        metrics = read_metrics(run_dir)
        assert metrics[-1]["step"] == 6
        logs = "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.log")))
        assert "resumed from" in logs
        restart_steps = [m["step"] for m in metrics]
        assert restart_steps.count(1) == 1, restart_steps  # the resubmission did not start from step 0
        reports = sorted((ROOT / "runs").glob("eval-*/metrics.json"))
        assert reports, "the evaluation wrote no report"
        export = run_dir / "export"
        assert (export / "perceptio.yaml").exists()
        exported_id = json.loads((export / "tokenizer.json").read_text())["id"]
        assert exported_id == tokenizer_id
        print("\nrehearsal timings:", ", ".join(f"{k} {s:.0f} s" for k, s in timings),
              f"total {time.time() - started:.0f} s")
    finally:
        for path in set(ROOT.glob("perceptio-*.out")) - set(outputs):
            shutil.move(path, tmp_path / path.name)  # kept with the test's files
        shutil.rmtree(run_dir, ignore_errors=True)
        for report in (ROOT / "runs").glob("eval-*"):
            if report.stat().st_mtime >= started:
                shutil.rmtree(report, ignore_errors=True)


def _readable(log: Path) -> str:
    """A job's SLURM log without Ray's raylet chatter, its end."""
    return "\n".join(line for line in log.read_text().splitlines() if "(raylet)" not in line)[-5000:]


def _complete(checkpoints: Path) -> bool:
    from perceptio_dist.train.checkpoint import is_complete

    return any(is_complete(p) for p in checkpoints.glob("global_step*"))
