"""A lost peer, as gloo reports it: a rank whose peer exits, and one whose peer stops answering, each get the error
they get in a real run; both are told apart from an ordinary error. Two processes on loopback, a few seconds."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time

import pytest

from perceptio_dist.parallel.distributed import free_port
from perceptio_dist.train.peer_loss import is_peer_loss


def _rank(rank: int, port: int, peer: str, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    dist.all_reduce(torch.ones(4))  # both connected
    if rank == 1:
        if peer == "exits":
            os._exit(0)
        time.sleep(30)  # "frozen": alive, connected, silent
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(4))
        results.put(("no error", False))
    except Exception as exc:  # noqa: BLE001
        results.put((f"{type(exc).__name__}: {exc}", is_peer_loss(exc)))


@pytest.mark.parametrize("peer", ["exits", "hangs"])
def test_a_peer_that_exits_or_hangs_is_a_peer_loss(peer):
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, port, peer, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        message, lost = results.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    assert message != "no error"
    assert lost, message


def test_an_ordinary_error_is_not_a_peer_loss():
    assert not is_peer_loss(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not is_peer_loss(ValueError("Connection closed by peer"))  # only errors a collective raises
    try:
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert is_peer_loss(outer)  # the cause counts
