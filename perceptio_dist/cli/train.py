"""perceptio-train: validate a recipe, then train (in this process, or on local ranks through torchrun)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from ..config import ConfigError
from . import CONFIG_ERROR_EXIT, PRINTED_ERRORS_VARIABLE, config_error_exit, load_or_exit, recipe_parser


def main(argv: list[str] | None = None) -> None:
    """perceptio-train [--nproc-per-node N] [--resume auto|PATH] --recipe R [overrides]: validate, then train.

    With --nproc-per-node it launches torchrun, forwards SIGUSR1/SIGTERM to the ranks, and exits with
    the requeue status (75) when the ranks stopped for a signal after saving a checkpoint."""
    parser = recipe_parser("perceptio-train", "Train a Perceptio model with DeepSpeed.")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="launch this many local ranks with torchrun (omit when already under torchrun/srun)")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="nodes taking part (one perceptio-train per node, e.g. under srun); needs --rdzv-endpoint")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="c10d rendezvous on the first node (multi-node runs)")
    parser.add_argument("--rdzv-id", default="perceptio", help="rendezvous id shared by the nodes of one run")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest complete checkpoint (auto) or from PATH")
    args = parser.parse_args(argv)
    redirect_rank_stderr()
    if args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_or_exit(args.recipe, overrides)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        from ..config.training import validate_runtime

        try:  # a rank-count mistake (batch arithmetic, pipeline stages) stops here, not in every rank
            validate_runtime(cfg, args.nproc_per_node * args.nnodes)
        except ConfigError as exc:
            config_error_exit(exc)
        if args.rdzv_endpoint:
            rendezvous = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                          f"--rdzv-id={args.rdzv_id}"]
        else:
            rendezvous = ["--standalone"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
               f"--nproc_per_node={args.nproc_per_node}", "-m", "perceptio_dist.train",
               "--recipe", args.recipe, *overrides]
        raise SystemExit(launch_ranks(cmd, Path(cfg.logging.output_dir)))
    from ..train.peer_loss import is_peer_loss, peer_lost_exit
    from ..train.trainer import Trainer

    try:
        Trainer(cfg).train()
    except ConfigError as exc:  # errors only visible at run time (paths, rank count, checkpoint)
        config_error_exit(exc)
    except Exception as exc:  # noqa: BLE001  (re-raised unless a peer is gone)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and is_peer_loss(exc):
            run_dir = Path(cfg.logging.output_dir)
            peer_lost_exit(exc, run_dir, Path(cfg.checkpoint.dir or run_dir / "checkpoints"), cfg.parallel.timeout_minutes)
        raise


# The ranks write to the launcher's own stderr (not to torchrun's, which the launcher reads): see launch_ranks.
RANK_STDERR_VARIABLE = "PERCEPTIO_LAUNCHER_STDERR"
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)


def launch_ranks(cmd: list[str], run_dir: Path) -> int:
    """Run torchrun, forwarding preemption signals to the rank processes; map a requeue stop to its status.

    A user error found by the ranks (a config error, a damaged shard: each prints its paragraph and exits with
    status 2) ends the launch with status 2 and without torchrun's ChildFailedError traceback, which says nothing
    more. Any other failure shows torchrun's report as it is (the failing rank, its exit code, its traceback)."""
    import shutil
    import subprocess
    import tempfile
    import threading

    import psutil

    from ..train.peer_loss import PEER_LOST_EXIT_CODE, PEER_LOST_MARKER
    from ..train.signals import REQUEUE_EXIT_CODE, REQUEUE_MARKER

    (run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
    (run_dir / PEER_LOST_MARKER).unlink(missing_ok=True)
    # torchrun's own stderr comes through a pipe so that its report of a failure can be held back; the ranks
    # reopen this process's stderr (redirect_rank_stderr) and are not delayed or filtered.
    printed = Path(tempfile.mkdtemp(prefix="perceptio_errors_"))  # errors the ranks printed (config_error_exit)
    env = {**os.environ, RANK_STDERR_VARIABLE: f"/proc/{os.getpid()}/fd/2", PRINTED_ERRORS_VARIABLE: str(printed)}
    # SLURM signals every process of a job step, torchrun's agent included, whose default action on
    # SIGUSR1 is to die and take the ranks down unsaved. The agent is started with SIGUSR1 ignored (an
    # ignored disposition survives exec); the ranks install their own handler (train/signals.py).
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    report: list[str] = []

    def relay() -> None:
        holding = False
        for line in proc.stderr:
            holding = holding or line.startswith("Traceback (most recent call last)") or "ChildFailedError" in line
            if holding:
                report.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()

    def forward(signum, _frame):
        # To the ranks (torchrun's direct children): not to torchrun's agent, whose default action on SIGUSR1
        # would kill them unsaved, nor to their data-loader workers.
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:  # torchrun has already ended (the ranks with it)
            return
        for child in children:
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    code = proc.wait()
    reader.join(timeout=30)
    shutil.rmtree(printed, ignore_errors=True)
    if (run_dir / REQUEUE_MARKER).exists():
        return REQUEUE_EXIT_CODE
    text = "".join(report)
    if code != 0 and (run_dir / PEER_LOST_MARKER).exists():
        return PEER_LOST_EXIT_CODE  # the ranks said so; torchrun's report of their exit adds nothing
    if code != 0 and _user_error_report(text):
        return CONFIG_ERROR_EXIT  # the rank said what was wrong; torchrun's traceback would only bury it
    sys.stderr.write(text)
    return code


def _user_error_report(report: str) -> bool:
    """Whether torchrun's failure report says: the first rank to fail stopped with a user error (status 2), and
    every other failed rank did too or was stopped by torchrun itself (SIGTERM) because of it."""
    _, found, root = report.partition("Root Cause (first observed failure):")
    root_codes = [int(c) for c in _EXITCODE.findall(root)]
    others = {int(c) for c in _EXITCODE.findall(report.partition(found)[0])} if found else set()
    return bool(found) and root_codes[:1] == [CONFIG_ERROR_EXIT] and others <= {CONFIG_ERROR_EXIT, -signal.SIGTERM}


def redirect_rank_stderr() -> None:
    """On a rank started by launch_ranks: write to the launcher's stderr (where the user looks) rather than to
    torchrun's, which the launcher filters. Where it cannot be reopened (a socket), torchrun's is kept."""
    target = os.environ.get(RANK_STDERR_VARIABLE)
    if not target or "LOCAL_RANK" not in os.environ:
        return
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    main()
