"""Process-group setup: torchrun/deepspeed/srun environments, or a plain single process."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on loopback now (for a rendezvous or a local Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the default process group; a plain `python` run becomes a 1-rank group."""
    import deepspeed

    if "RANK" not in os.environ:  # not launched by torchrun/deepspeed/srun: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        # LOCAL_SIZE is kept away from DeepSpeed while its backend starts: with LOCAL_SIZE equal to the world size,
        # DeepSpeed's CPU backend creates a 69 MB /dev/shm segment per rank for its inference all-reduce (which
        # training never calls) and never unlinks it, so every run leaked it until /dev/shm filled.
        inherited_local_size = os.environ.pop("LOCAL_SIZE", None)
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False
        )
        if inherited_local_size is not None:
            os.environ["LOCAL_SIZE"] = inherited_local_size
    if not torch.cuda.is_available() and "LOCAL_WORLD_SIZE" in os.environ:  # torchrun's, or a world of one's
        # DeepSpeed's CPU accelerator counts "devices" (local ranks) from LOCAL_SIZE, which only DeepSpeed's own
        # launcher sets; without it every count runs `numactl --hardware` in a subprocess, and ZeRO-3 counts once
        # per gradient bucket (about 50 forks a step for the tiny recipe).
        os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (a decision all ranks must take together)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
