"""Preemption signals: SIGUSR1 (SLURM's warning before the time limit or preemption) and SIGTERM.

The handler only records the request; the trainer checks it after each step, agrees across ranks
(any rank asked -> everyone stops), saves a checkpoint together and exits with REQUEUE_EXIT_CODE,
which launchers (perceptio-train, slurm/train_8b.sh) turn into a requeue.
"""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again
NONFINITE_EXIT_CODE = 3  # too many non-finite losses in a row: a diagnostic checkpoint was saved
REQUEUE_MARKER = "requeue.json"  # written in the run folder by rank 0 before a requeue exit


class StopRequest:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
