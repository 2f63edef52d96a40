"""The suite's own process launcher: a test that times out must not leave its children running."""

from __future__ import annotations

import subprocess
import time

import pytest

from .conftest import run_process


def test_a_timed_out_process_takes_its_whole_group_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the child a launcher starts (torchrun's rank, a Ray worker), then the launcher waiting on it
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_process(["bash", "-c", script], timeout=2)
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and _state(child) not in ("gone", "Z"):
        time.sleep(0.1)
    assert _state(child) in ("gone", "Z"), "the child outlived the timeout"


def test_a_finished_process_returns_its_output_and_status():
    proc = run_process(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def _state(pid: int) -> str:
    """The process's state letter (Z: a zombie, dead but not yet reaped), or "gone"."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
