"""Which sample each slot of each step reads: pure arithmetic on (seed, global batch, step), epochs global per task.

Slot s of step k (s < G, the global batch) first draws a task by the configured weights. The draws of all G
slots of a step come from one generator seeded by (seed, k-block), so they depend on the global batch, not on
how ranks and accumulation split it. The draw then takes the task's next position c in *global* order: c counts
the task's draws of every earlier step and of the earlier slots of this step. Position c is sample c mod N of
the task's epoch c div N (N: the task's sample count), so within an epoch every sample of a task is read exactly
once across all slots and ranks, whatever the shard sizes, and the next epoch starts only when it is done.

An epoch's order: the task's shards are shuffled with (seed, task, epoch) and cut into windows of ``window``
consecutive shards; the samples of a window are shuffled together with (seed, task, epoch, window), and the
windows are read one after the other. The trade: a step's samples of a task come from one window (two at a
boundary), so a rank has at most about ``window`` shards of a task open at a time, in exchange for mixing
samples only within a window (shards themselves are visited in a fresh random order every epoch). window = the
shard count gives a full shuffle of the epoch.

A curriculum (data.curriculum) gives earlier steps other task weights: phase p holds until its ``until_step``,
the last weights hold after. Within a block, the rows of each phase are drawn one phase after the other from the
block's generator, so a block inside one phase draws exactly what a run without the curriculum draws.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

STEP_BLOCK = 256  # steps of task choices drawn, counted and cached together


@dataclass(frozen=True)
class SampleRef:
    task: str
    shard: int  # index into the task's shard list
    index: int  # sample index inside the shard, in stored order
    epoch: int  # the task's epoch this read belongs to


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class TaskEpochOrder:
    """Position inside one task's epoch -> (shard, sample): shuffled shards, windows of shards shuffled within."""

    def __init__(self, shard_sizes: list[int], seed: int, task_id: int, window: int):
        if not shard_sizes or min(shard_sizes) < 1:
            raise ValueError("every shard of a task needs at least one sample")
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.seed, self.task_id, self.window = seed, task_id, max(1, int(window))
        self._epochs: _LRU = _LRU(4)
        self._windows: _LRU = _LRU(4)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start position of each window in the epoch, ending with the total)."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, 1, self.task_id, epoch]).permutation(len(self.sizes))
            sizes = self.sizes[order]
            bounds = np.concatenate([[0], np.cumsum(sizes)])[:: self.window]
            starts = np.append(bounds, self.total) if bounds[-1] != self.total else bounds
            self._epochs.put(epoch, (order, starts))
        return self._epochs[epoch]

    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard of each position in window w, sample index of each position), shuffled together."""
        key = (epoch, w)
        if key not in self._windows:
            order, _ = self._epoch(epoch)
            shards = order[w * self.window:(w + 1) * self.window]
            which = np.concatenate([np.full(self.sizes[s], s) for s in shards])
            index = np.concatenate([np.arange(self.sizes[s]) for s in shards])
            perm = np.random.default_rng([self.seed, 2, self.task_id, epoch, w]).permutation(len(which))
            self._windows.put(key, (which[perm], index[perm]))
        return self._windows[key]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard, sample index) of the task's global read number ``position``."""
        epoch, offset = divmod(int(position), self.total)
        _, starts = self._epoch(epoch)
        w = bisect.bisect_right(starts, offset) - 1
        which, index = self._window(epoch, w)
        k = offset - int(starts[w])
        return epoch, int(which[k]), int(index[k])


class GlobalSampler:
    """(step, slot) -> SampleRef for a global batch of ``num_slots``; any rank computes any slot's sample.

    ``phases``: the curriculum, (until_step, weights) with until_step increasing; ``weights`` hold after the last.
    """

    def __init__(self, tasks: list[str], weights: np.ndarray, shard_sizes: dict[str, list[int]], seed: int,
                 num_slots: int, window: int, phases: list[tuple[int, np.ndarray]] = ()):
        self.tasks, self.weights, self.seed, self.num_slots = tasks, np.asarray(weights, float), seed, num_slots
        self.phases = [(int(until), np.asarray(w, float)) for until, w in phases]
        if any(b[0] <= a[0] for a, b in zip(self.phases, self.phases[1:])):
            raise ValueError("curriculum phases must end at increasing steps")
        self.orders = [TaskEpochOrder(shard_sizes[t], seed, i, window) for i, t in enumerate(tasks)]
        self._choices_cache: _LRU = _LRU(4)
        self._block_starts = [np.zeros(len(tasks), dtype=np.int64)]  # task reads before each step block

    def _segments(self, first: int, end: int) -> list[tuple[int, np.ndarray]]:
        """(rows, weights) of the steps first..end-1, one segment per curriculum phase they touch, in order."""
        segments, step = [], first
        for until, weights in self.phases:
            if step < min(until, end):
                segments.append((min(until, end) - step, weights))
                step = min(until, end)
        if step < end:
            segments.append((end - step, self.weights))
        return segments

    def _choices(self, b: int) -> np.ndarray:
        """The task of every slot for the steps of block b: [STEP_BLOCK, G]."""
        rng = np.random.default_rng([self.seed, 3, b])
        return np.concatenate([rng.choice(len(self.tasks), size=(rows, self.num_slots), p=weights)
                               for rows, weights in self._segments(b * STEP_BLOCK, (b + 1) * STEP_BLOCK)])

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(block b's task choices, the reads of each task before each of its steps)."""
        if b not in self._choices_cache:
            choices = self._choices(b)
            per_step = np.stack([np.bincount(row, minlength=len(self.tasks)) for row in choices])
            before = self.block_start(b) + np.concatenate([np.zeros((1, len(self.tasks)), np.int64),
                                                             np.cumsum(per_step, axis=0)[:-1]])
            self._choices_cache.put(b, (choices, before))
        return self._choices_cache[b]

    def block_start(self, b: int) -> np.ndarray:
        """Reads of each task before block b, counted once, in order, however far a resume jumps."""
        while len(self._block_starts) <= b:
            k = len(self._block_starts) - 1
            counts = np.bincount(self._choices(k).ravel(), minlength=len(self.tasks))
            self._block_starts.append(self._block_starts[k] + counts)
        return self._block_starts[b]

    def draw(self, step: int, slot: int) -> SampleRef:
        b, i = divmod(int(step), STEP_BLOCK)
        choices, before = self._block(b)
        row = choices[i]
        t = int(row[slot])
        position = int(before[i, t]) + int(np.count_nonzero(row[:slot] == t))
        epoch, shard, index = self.orders[t].locate(position)
        return SampleRef(self.tasks[t], shard, index, epoch)
