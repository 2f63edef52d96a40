"""What produced a shard: a teacher pass (depth maps, no codes), a code pass from its shards, shards rebuilt when
their tokenizer changes and kept when nothing that shapes them did, and training that refuses another tokenizer's
codes. One private Ray instance for the module; every pass is the real job (preprocess/job.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.model.config import DepthVQVAEConfig
from perceptio_dist.data.shards import npy_load, read_manifest, read_shard
from perceptio_dist.data.training_data import check_manifest_matches
from perceptio_dist.model.depth_vqvae import TOKENIZER_ID_KEY, DepthVQVAE, load_depth_vqvae, tokenizer_identity
from perceptio_dist.preprocess.config import load_preprocess_config

from .conftest import NO_TOKENIZER

ARCH = DepthVQVAEConfig(input_size=32, code_dim=16, base_channels=8, max_channels=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _tokenizer(path: Path, seed: int, identity: str) -> str:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = DepthVQVAE(ARCH, 32, 4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={TOKENIZER_ID_KEY: identity})
    return str(path)


def _run(*overrides: str) -> dict:
    from perceptio_dist.preprocess.job import preprocess

    return preprocess(load_preprocess_config("preprocess_tiny", list(overrides)))


def _samples(folder: Path) -> dict:
    manifest = read_manifest(folder)
    return {s.key: s for shard in manifest["shards"] for s in read_shard(folder / shard["path"])}


def _written(folder: Path) -> dict:
    return {p.name: json.loads(p.read_text())["written"] for p in folder.rglob("*-0*.json")}


def test_teacher_pass_then_code_pass_then_a_retrained_tokenizer_rebuilds(tmp_path, ray_local, caplog):
    from perceptio_dist.preprocess.scenes.folders import write_scenes

    write_scenes(tmp_path / "scenes", 3, progress=False)
    first = _tokenizer(tmp_path / "a.safetensors", 1, "vqvae-aaaaaaaaaaaaaaaa")
    second = _tokenizer(tmp_path / "b.safetensors", 2, "vqvae-bbbbbbbbbbbbbbbb")
    teacher, codes = tmp_path / "teacher", tmp_path / "codes"

    # 1. the teacher pass: depth maps, no codes, no tokenizer
    manifest = _run(f"sources.0.path={tmp_path / 'scenes'}", f"output_dir={teacher}", "shard_size=8",
                    "depth_codes=false", "depth_vqvae.checkpoint=null")
    assert manifest["depth"]["codes"] is False and manifest["identities"]["depth_tokenizer"] is None
    stored = _samples(teacher)
    with_depth = {k: s for k, s in stored.items() if s.depth_npy}
    assert with_depth and not any(s.codes_npy for s in stored.values())

    # a retrained tokenizer of another architecture does not make the teacher pass stale
    teacher_written = _written(teacher)
    _run(f"sources.0.path={tmp_path / 'scenes'}", f"output_dir={teacher}", "shard_size=8", "depth_codes=false",
         "depth_vqvae.checkpoint=null", "depth_vqvae.code_dim=8", "depth_vqvae.base_channels=4")
    assert _written(teacher) == teacher_written

    # 2. the code pass: every sample again, its codes the tokenizer's encoding of the stored map
    code_pass = ["sources=[]", f"from_shards={teacher}", f"output_dir={codes}", "shard_size=8"]
    manifest = _run(*code_pass, f"depth_vqvae.checkpoint={first}")
    assert manifest["identities"]["depth_tokenizer"] == "vqvae-aaaaaaaaaaaaaaaa"
    assert manifest["num_samples"] == len(stored)

    def assert_codes_from(tokenizer: str) -> None:
        model = load_depth_vqvae(ARCH, 32, 4, tokenizer).eval()
        rewritten = _samples(codes)
        assert rewritten.keys() == stored.keys()
        for key, sample in with_depth.items():
            depth = torch.from_numpy(npy_load(sample.depth_npy).astype(np.float32))[None, None]
            with torch.no_grad():
                expected = model.encode(depth).numpy().reshape(-1)
            assert np.array_equal(npy_load(rewritten[key].codes_npy).reshape(-1), expected), key
            assert rewritten[key].image == sample.image and rewritten[key].depth_npy == sample.depth_npy

    assert_codes_from(first)

    # 3. the same pass again: nothing rebuilt; moving to more hardware rebuilds nothing either
    before = _written(codes)
    _run(*code_pass, f"depth_vqvae.checkpoint={first}", "tokenizer_num_cpus=1.0")
    assert _written(codes) == before

    # 4. a retrained tokenizer (same K, grid and size): every shard rebuilt with its codes
    manifest = _run(*code_pass, f"depth_vqvae.checkpoint={second}")
    assert manifest["identities"]["depth_tokenizer"] == "vqvae-bbbbbbbbbbbbbbbb"
    assert all(_written(codes)[name] > before[name] for name in before)
    assert {s["producer"]["depth_tokenizer"] for s in manifest["shards"]} == {"vqvae-bbbbbbbbbbbbbbbb"}
    assert_codes_from(second)

    # 5. training: the model's tokenizer must be the one that made the codes
    def cfg(tokenizer: str | None):
        return load_config("tiny_cpu", [f"data.shards={codes}", NO_TOKENIZER,
                                        f"model.depth_vqvae.checkpoint={tokenizer or 'null'}"])

    check_manifest_matches(manifest, cfg(second), str(codes))
    with pytest.raises(ConfigError) as error:
        check_manifest_matches(manifest, cfg(first), str(codes))
    assert "vqvae-bbbbbbbbbbbbbbbb" in str(error.value) and "vqvae-aaaaaaaaaaaaaaaa" in str(error.value)
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.WARNING):
        check_manifest_matches(manifest, cfg(None), str(codes))  # a random tokenizer: tests, demos
    assert "depth codes unchecked" in caplog.text
    with pytest.raises(ConfigError, match="teacher pass"):
        check_manifest_matches(read_manifest(teacher), cfg(second), str(teacher))


def test_a_tokenizer_keeps_its_id_through_an_export_of_its_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    original = _tokenizer(tmp_path / "t.safetensors", 0, "vqvae-0123456789abcdef")
    # an export re-saves the weights (another dtype here): the id is carried, not recomputed from the bytes
    resaved = tmp_path / "export" / "depth_vqvae.safetensors"
    resaved.parent.mkdir()
    save_file({k: v.half() for k, v in load_file(original).items()}, str(resaved),
              metadata={TOKENIZER_ID_KEY: tokenizer_identity(original)})
    assert tokenizer_identity(str(resaved)) == "vqvae-0123456789abcdef"
    assert tokenizer_identity(None) == "random"
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(original), str(bare))
    assert tokenizer_identity(str(bare)) == "unknown:bare.safetensors"
