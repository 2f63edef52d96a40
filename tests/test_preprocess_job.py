"""The preprocessing job submitted with `ray job submit` to a real local Ray head (loopback only,
token authentication), over synthetic scenes and small real-format fixtures of every adapter."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio_dist.preprocess.scenes.folders import write_scenes
from perceptio_dist.data.shards import npy_load, read_manifest, read_shard
from perceptio_dist.parallel.distributed import free_port

from .conftest import ROOT
from .fixtures import make_coco, make_image_folder, make_llava, make_refcoco, save_tiny_depth_anything

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with its own token; stopped with `ray stop` when the test ends."""
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           # the job's `python` must be this venv's, also when pytest was not started from an activated venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dashboard = free_port()
    start = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(address: str, env: dict, config: Path, timeout: int = 900) -> str:
    deadline = time.time() + 300  # the job server refuses jobs until the head's agent has registered
    while True:
        proc = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "python", "-m", "ray_jobs.preprocess", "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])
    summary = [line for line in proc.stdout.splitlines() if line.startswith('{"output_dir"')]
    assert summary, proc.stdout[-3000:]
    return summary[-1]


def test_ray_job_submit_writes_shards_quarantines_bad_records_and_skips_finished_shards(tmp_path, ray_head):
    address, env = ray_head
    write_scenes(tmp_path / "scenes", 6, progress=False)
    make_refcoco(tmp_path / "refer")
    coco = make_coco(tmp_path / "coco")
    llava = make_llava(tmp_path / "llava")
    images = make_image_folder(tmp_path / "images")
    teacher = save_tiny_depth_anything(tmp_path / "depth_anything")
    out = tmp_path / "shards"
    config = tmp_path / "preprocess.yaml"
    config.write_text(f"""
output_dir: {out}
split: train
shard_size: 4
sources:
  - {{type: synthetic, path: {tmp_path / 'scenes'}}}
  - {{type: refcoco, path: {tmp_path / 'refer'}, dataset: refcoco, split_by: unc, splits: [train]}}
  - {{type: coco, path: {coco}}}
  - {{type: llava, path: {llava}}}
  - {{type: image_folder, path: {images}}}
teacher: {{pretrained_path: {teacher}, input_size: 56, batch_size: 2, concurrency: 1, num_cpus: 0.5}}
tokens: {{num_depth_codes: 32, depth_grid: 4}}
depth_vqvae: {{input_size: 32, code_dim: 16, base_channels: 8, max_channels: 32, num_res_blocks: 1}}
decode_concurrency: 1
tokenizer_num_cpus: 0.5
""")
    first = json.loads(_submit(address, env, config))
    manifest = read_manifest(out)
    counts = manifest["counts"]
    # refcoco: 3 train sentences; coco: 1 usable of 3 (empty mask and missing image quarantined); llava: 1
    # (text-only entry skipped by the adapter); image folder: 3 of 4 (one unreadable file)
    assert counts["source"]["refcoco"] == 3 and counts["source"]["coco"] == 1 and counts["source"]["llava"] == 1
    assert counts["source"]["image_folder:images"] == 3 and counts["source"]["synthetic"] > 20
    assert manifest["num_samples"] == sum(counts["task"].values()) == sum(counts["source"].values())
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    reasons = {Path(q["image"]).name: q["reason"] for q in quarantine}
    assert manifest["quarantined"] == len(quarantine) == 3
    assert "empty mask" in reasons["000002.jpg"] and "FileNotFoundError" in reasons["000003.jpg"]
    assert "UnidentifiedImageError" in reasons["broken.jpg"]
    assert manifest["identities"]["teacher"].startswith("depth_anything:depth_anything:")
    assert first["shards_skipped"] == 0 and first["shards_written"] == len(manifest["shards"])

    seen = Counter()
    for shard in manifest["shards"]:
        for sample in read_shard(out / shard["path"]):
            info = sample.info
            seen[info["source"]] += 1
            image = Image.open(io.BytesIO(sample.image))
            assert image.size == (info["image_size"][1], info["image_size"][0])
            if info["with_seg"]:
                mask = np.asarray(Image.open(io.BytesIO(sample.mask_png)))
                assert mask.shape == tuple(info["image_size"]) and mask.max() == 255
            if info["with_depth"]:
                assert npy_load(sample.codes_npy).shape == (16,)
                assert npy_load(sample.depth_npy).shape == (32, 32)
    assert seen == Counter(counts["source"])

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    second = json.loads(_submit(address, env, config))
    assert second["shards_written"] == 0 and second["shards_skipped"] == len(manifest["shards"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # nothing rewritten

    victim = out / manifest["shards"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-100])  # a damaged shard is redone, the rest kept
    third = json.loads(_submit(address, env, config))
    assert third["shards_written"] == 1 and read_manifest(out)["shards"][0]["sha256"] == manifest["shards"][0]["sha256"]


def test_training_job_refuses_evaluation_data(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"output_dir: {tmp_path}\nsources:\n  - {{type: hardblink, path: {tmp_path}}}\n")
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.preprocess", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "never train on it" in proc.stderr and "Traceback" not in proc.stderr
