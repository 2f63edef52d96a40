"""What a first GPU run needs, checked where a CPU can: every tensor on the rank's device after the engine starts
(parallel/placement.py; "meta" stands in for the GPU), the depth-ordered code rows computed where the backbone
lives, the CUDA random state in checkpoints, deterministic mode."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from perceptio_dist.model.config import DepthVQVAEConfig
from perceptio_dist.experiments.toy.initialisers import order_code_rows
from perceptio_dist.model.depth_vqvae import DepthVQVAE
from perceptio_dist.model.spatial_tokens import SpatialTokenIds
from perceptio_dist.parallel.placement import check_placement, place_unmanaged


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.register_buffer("gaussian_matrix", torch.randn(2, 4))  # like SAM2's positional encoding


def test_a_tensor_left_on_another_device_is_named_after_the_engine_starts():
    model = nn.Module()
    model.head = Head()
    model.codebook = nn.Module()
    model.codebook.register_buffer("embed", torch.empty(5, 3, device="meta"))
    with pytest.raises(RuntimeError, match=r"1 tensor\(s\).*codebook\.embed \(buffer, on meta\)"):
        check_placement(model, torch.device("cpu"))


def test_buffers_move_and_partitioned_parameters_are_left_to_deepspeed():
    """The rank's device is "meta" here: the linear layer already is on it, its buffer is not (as SAM2's head
    under ZeRO-3), and a ZeRO-3 parameter stays where DeepSpeed put it."""
    model = Head()
    model.proj.to("meta")
    partitioned = nn.Parameter(torch.ones(2))
    partitioned.ds_id = 7
    model.register_parameter("zero3", partitioned)
    target = torch.device("meta")
    with pytest.raises(RuntimeError, match="gaussian_matrix"):
        check_placement(model, target)
    place_unmanaged(model, target)
    assert model.gaussian_matrix.device == target
    assert model.zero3.device == torch.device("cpu")
    check_placement(model, target)


def test_depth_ordered_rows_are_computed_where_the_rows_live():
    """Under ZeRO-3's partitioned build the backbone's rows are on the GPU and the VQ-VAE on the CPU."""
    vqvae = DepthVQVAE(DepthVQVAEConfig(input_size=16, code_dim=8, base_channels=4, max_channels=8), 6, 4)
    ids = SpatialTokenIds(seg=10, depth_start=11, depth_end=12, code_start=13, num_codes=6, num_depth_tokens=16)
    embeddings, lm_head = nn.Embedding(19, 8, device="meta"), nn.Linear(8, 19, bias=False, device="meta")
    z = order_code_rows(embeddings, lm_head, vqvae, ids, seed=0)
    assert z.shape == (6,) and embeddings.weight.device.type == "meta"


def test_deterministic_mode_is_set_before_cuda_starts(monkeypatch):
    from perceptio_dist.train.trainer import use_deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        use_deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_checkpoint_random_state_restores_every_generator():
    from perceptio_dist.train.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    assert ("cuda" in saved) == torch.cuda.is_available()
    draws = [torch.rand(3), np.random.rand(3), random.random()]
    if torch.cuda.is_available():
        draws.append(torch.rand(3, device="cuda").cpu())
    set_rng_state(saved)
    again = [torch.rand(3), np.random.rand(3), random.random()]
    if torch.cuda.is_available():
        again.append(torch.rand(3, device="cuda").cpu())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    if torch.cuda.is_available():  # the CUDA generator: checked only where there is one
        assert torch.equal(draws[3], again[3])


def test_the_training_script_gives_triton_a_node_local_cache_and_torch_expandable_segments():
    from .conftest import ROOT

    script = (ROOT / "slurm" / "train_8b.sh").read_text()
    assert "export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/" in script
    assert "export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" in script


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla V100-SXM2-32GB", 125.0),
    ("NVIDIA GeForce RTX 4090", None)])
def test_each_gpu_variant_gets_its_own_datasheet_peak(name, peak):
    """Dense bf16 TFLOP/s from NVIDIA's datasheets (half the sparse figure they headline)."""
    from perceptio_dist.train.flops import gpu_peak_tflops

    assert gpu_peak_tflops(name) == peak


def _verify_on_rank(rank: int, world: int, port: int, folder: str, results) -> None:
    import datetime

    import torch.distributed as dist

    import perceptio_dist.train.checkpoint as checkpoint
    from perceptio_dist.parallel.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    hashed = []
    real = checkpoint.file_sha256
    checkpoint.file_sha256 = lambda path: hashed.append(path.name) or real(path)
    manager = checkpoint.CheckpointManager(Path(folder).parent, DistInfo(rank, world, 0, torch.device("cpu")))
    verdict = manager.verify(Path(folder))
    results.put((rank, verdict, hashed))
    dist.destroy_process_group()


def test_checkpoint_files_are_hashed_once_over_the_ranks_present_and_all_agree(tmp_path):
    """A checkpoint written by 2 ranks, checked by 3: each file hashed by one rank, the same verdict on all."""
    import json
    import multiprocessing as mp

    from perceptio_dist.data.shards import file_sha256
    from perceptio_dist.parallel.distributed import free_port

    folder = tmp_path / "checkpoints" / "global_step00000004"
    folder.mkdir(parents=True)
    for i in range(7):
        (folder / f"part{i}.pt").write_bytes(bytes([i]) * (100 + i))
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in folder.iterdir()}
    (folder / "COMPLETE.json").write_text(json.dumps({"step": 4, "world_size": 2, "files": files}))
    (folder / "part5.pt").write_bytes(bytes([9]) * 105)  # same size, other bytes: only a checksum can tell

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_verify_on_rank, args=(r, 3, port, str(folder), results)) for r in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    verdicts = {verdict for _, verdict, _ in got}
    assert verdicts == {"part5.pt does not match its checksum"}
    hashed = sorted(name for _, _, names in got for name in names)
    assert hashed == sorted(files)  # every file once, none twice
    assert all(len(names) in (2, 3) for _, _, names in got)  # 7 files over 3 ranks
