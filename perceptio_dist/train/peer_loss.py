"""A peer lost mid-run: a node that died (its sockets closed) or hangs (no answer within the collective timeout).

The surviving ranks cannot finish the step without it, and no in-process recovery is safe (the process group is
broken, ZeRO shards of the lost ranks are gone): each surviving rank says so in one paragraph, notes it in the run
folder and exits with PEER_LOST_EXIT_CODE. The launcher (perceptio-train) passes that status on and
slurm/train_8b.sh requeues the job, which resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

PEER_LOST_EXIT_CODE = 76  # not a sysexits.h code: chosen next to REQUEUE_EXIT_CODE (75)
PEER_LOST_MARKER = "peer_lost.json"  # written in the run folder by every rank that saw the loss

# What gloo and NCCL raise when a peer's connection closes, resets or stays silent past the timeout. Matched on
# the message: gloo raises plain RuntimeError for all of these, so the type alone does not tell a lost peer from
# a programming error.
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting \d+ms for (recv|send)"
    r"|Application timeout caused pair closure"
    r"|Socket Timeout|NCCL communicator was aborted|ncclRemoteError|Watchdog caught collective operation timeout"
    r"|remote process exited or there was a network error"
)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a collective failing because a peer is gone."""
    import torch.distributed as dist

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, getattr(dist, "DistNetworkError", ())) or (
                isinstance(exc, RuntimeError) and _PEER_FAILURE.search(str(exc))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def peer_lost_exit(exc: BaseException, run_dir: Path, checkpoints: Path, timeout_minutes: float) -> None:
    """Print what happened and what comes next, note it in the run folder, exit with PEER_LOST_EXIT_CODE."""
    rank = os.environ.get("RANK", "0")
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"rank {rank} on {node}: a peer rank stopped answering, so this rank stops too. Another node died, hung "
          f"or lost its network (waited at most parallel.timeout_minutes={timeout_minutes:g} for it). The newest "
          f"complete checkpoint in {checkpoints} is intact; slurm/train_8b.sh requeues the job, and any "
          f"`--resume auto` launch continues from it. ({first_line[:300]})", file=sys.stderr, flush=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / PEER_LOST_MARKER, "a") as marker:
            marker.write(json.dumps({"rank": int(rank), "node": node, "time": time.time(), "error": first_line}) + "\n")
    except OSError:
        pass  # the run folder itself may be what failed; the exit status still says it
    raise SystemExit(PEER_LOST_EXIT_CODE)
