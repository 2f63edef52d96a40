"""Streaming, task-mixing, exactly resumable loader over preprocessed shards.

Slots. One optimizer step reads a global batch of G = ranks x grad_accum x micro samples; sample j of
the global batch comes from *slot* j, which owns a deterministic, endless stream, one draw per step.
Rank r's micro-batch m of step k holds slots (m * ranks + r) * micro + b for b < micro, draw k of each.
The samples of step k therefore depend only on (seed, G, k), not on how G is split:

* resuming is exact: the state is the number of micro-batches a rank has consumed;
* one rank with accumulation 2 and two ranks with accumulation 1 read the same samples each step;
* an elastic resume (another rank count or accumulation, same G) continues with the same samples;
* DataLoader workers split a rank's micro-batches round-robin; each builds whole micro-batches.

Streams. Draw k of slot s picks a task by the configured weights (seeded by seed, s and k's block),
then takes that task's next sample for slot s. Per task and epoch e, shards are shuffled with
(seed, task, e) and dealt to slots (shard i -> slot i mod G; with fewer shards than slots, a shard's
samples are dealt to the slots sharing it), and each shard's samples are shuffled with
(seed, task, e, shard). Every sample is read by exactly one slot per epoch of its task.

A sample that fails to decode, or is too long, is dropped from its micro-batch (which gets smaller)
and counted: the batch composition stays a function of the index, so resume stays exact. A micro-batch
whose samples all fail stops the run with an error (every rank must take part in every step).
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import Batch, collate
from .shards import ShardSample, read_manifest, read_shard

log = logging.getLogger(__name__)
CHOICE_BLOCK = 4096


@dataclass(frozen=True)
class ShardEntry:
    path: Path
    task: str
    num_samples: int


class TaskSlotIndex:
    """Where the c-th sample of one task for one slot comes from: pure arithmetic on shard sizes."""

    def __init__(self, shards: list[ShardEntry], seed: int, task_id: int, slot: int, num_slots: int):
        self.shards, self.seed, self.task_id, self.slot, self.num_slots = shards, seed, task_id, slot, num_slots
        self._plans: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._starts = [0]  # cumulative samples at the start of each epoch

    def _sample_order(self, epoch: int, shard: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, self.task_id, epoch, shard])
        return rng.permutation(self.shards[shard].num_samples)

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This slot's (shard, sample indices) for one epoch, in reading order."""
        if epoch not in self._plans:
            n, s = len(self.shards), self.num_slots
            order = np.random.default_rng([self.seed, 1, self.task_id, epoch]).permutation(n)
            plan = []
            if n >= s:
                for k in range(self.slot, n, s):
                    plan.append((int(order[k]), self._sample_order(epoch, int(order[k]))))
            else:  # fewer shards than slots: the slots with the same k share shard order[k]
                k, share = self.slot % n, self.slot // n
                sharing = len(range(k, s, n))
                plan.append((int(order[k]), self._sample_order(epoch, int(order[k]))[share::sharing]))
            if len(self._plans) > 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = plan
        return self._plans[epoch]

    def locate(self, c: int) -> tuple[int, int, int]:
        """(epoch, shard, sample index in the shard) of this slot's c-th sample of the task."""
        empty_run = 0
        while self._starts[-1] <= c:
            length = sum(len(idx) for _, idx in self.epoch_plan(len(self._starts) - 1))
            empty_run = empty_run + 1 if length == 0 else 0
            if empty_run > 1000:
                raise RuntimeError(f"slot {self.slot} never receives a sample of task {self.task_id}")
            self._starts.append(self._starts[-1] + length)
        epoch = bisect.bisect_right(self._starts, c) - 1
        offset = c - self._starts[epoch]
        for shard, idx in self.epoch_plan(epoch):
            if offset < len(idx):
                return epoch, shard, int(idx[offset])
            offset -= len(idx)
        raise AssertionError("unreachable")


class SlotStream:
    """Random access to one slot's endless sample stream: draw n -> (task, shard entry, sample index)."""

    def __init__(self, tasks: list[str], weights: np.ndarray, shards: dict[str, list[ShardEntry]], seed: int,
                 slot: int, num_slots: int):
        self.tasks, self.weights, self.seed, self.slot = tasks, weights, seed, slot
        self.index = {t: TaskSlotIndex(shards[t], seed, i, slot, num_slots) for i, t in enumerate(tasks)}
        self.shards = shards
        self._prefix = [np.zeros(len(tasks), dtype=np.int64)]  # task counts before each choice block
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            rng = np.random.default_rng([self.seed, 3, self.slot, b])
            self._blocks[b] = rng.choice(len(self.tasks), size=CHOICE_BLOCK, p=self.weights)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def draw(self, n: int) -> tuple[str, ShardEntry, int]:
        b, i = divmod(n, CHOICE_BLOCK)
        while len(self._prefix) <= b:
            k = len(self._prefix) - 1
            self._prefix.append(self._prefix[k] + np.bincount(self._block(k), minlength=len(self.tasks)))
        block = self._block(b)
        t = int(block[i])
        c = int(self._prefix[b][t] + np.count_nonzero(block[:i] == t))
        _, shard, sample = self.index[self.tasks[t]].locate(c)
        return self.tasks[t], self.shards[self.tasks[t]][shard], sample


class ShardCache:
    """The last few shards read, whole, in memory (a shard is read at most once per visit)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._cache: OrderedDict[Path, list[ShardSample]] = OrderedDict()

    def get(self, path: Path) -> list[ShardSample]:
        if path not in self._cache:
            self._cache[path] = list(read_shard(path))
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(path)
        return self._cache[path]


@dataclass
class LoaderItem:
    index: int  # this rank's micro-batch number
    batch: Batch
    skipped: list[str]  # keys dropped, with reasons


def _identity(item):
    return item


class _RankMicroBatches(IterableDataset):
    def __init__(self, loader: "ShardLoader", start: int):
        self.loader, self.start = loader, start

    def __iter__(self) -> Iterator[LoaderItem]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        i = self.start + worker
        while True:
            yield self.loader.micro_batch(i)
            i += workers


class ShardLoader:
    """This rank's micro-batches, in order, from micro-batch ``position`` on; ``state_dict`` resumes exactly."""

    def __init__(self, folder: str | Path, task_weights: dict[str, float], seed: int, rank: int, world_size: int,
                 grad_accum: int, micro_batch_size: int, builder, num_workers: int = 0, pad_token_id: int = 0):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.grad_accum, self.micro_batch_size, self.num_workers = grad_accum, micro_batch_size, num_workers
        self.builder, self.pad_token_id = builder, pad_token_id
        self.num_slots = world_size * grad_accum * micro_batch_size  # the global batch
        shards: dict[str, list[ShardEntry]] = {}
        for s in self.manifest["shards"]:
            if s["num_samples"]:
                shards.setdefault(s["task"], []).append(ShardEntry(self.folder / s["path"], s["task"], s["num_samples"]))
        self.tasks = sorted(t for t, w in task_weights.items() if w > 0 and t in shards)
        if not self.tasks:
            raise ValueError(f"none of the weighted tasks {sorted(task_weights)} has samples in {self.folder}")
        for task in self.tasks:
            total = sum(s.num_samples for s in shards[task])
            if total < self.num_slots:
                raise ValueError(f"task {task} has {total} samples in {self.folder}, fewer than the global batch of "
                                 f"{self.num_slots}: give it weight 0 or more data")
        weights = np.array([task_weights[t] for t in self.tasks], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.shards = shards
        self._streams: dict[int, SlotStream] = {}
        self._cache = ShardCache()
        self.position = 0  # micro-batches consumed by this rank
        self.skipped = 0

    # ---------------------------------------------------------------- pure functions of the index

    def slots_and_step(self, i: int) -> tuple[list[int], int]:
        """Rank-local micro-batch i -> (the global-batch slots it holds, the step)."""
        step, micro = divmod(i, self.grad_accum)
        first = (micro * self.world_size + self.rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size)), step

    def _stream(self, slot: int) -> SlotStream:
        if slot not in self._streams:
            self._streams[slot] = SlotStream(self.tasks, self.weights, self.shards, self.seed, slot, self.num_slots)
        return self._streams[slot]

    def sample_refs(self, i: int) -> list[tuple[str, ShardEntry, int]]:
        slots, step = self.slots_and_step(i)
        return [self._stream(slot).draw(step) for slot in slots]

    def micro_batch(self, i: int) -> LoaderItem:
        samples, keys, skipped = [], [], []
        for _task, shard, index in self.sample_refs(i):
            raw = self._cache.get(shard.path)[index]
            try:
                samples.append(self.builder(raw))
                keys.append(raw.key)
            except Exception as exc:  # corrupt or too long: dropped and counted, never fatal
                skipped.append(f"{raw.key}: {type(exc).__name__}: {exc}")
        if not samples:
            raise RuntimeError(f"every sample of micro-batch {i} failed ({'; '.join(skipped)}): the shards in "
                               f"{self.folder} look damaged, or data.max_seq_len is too small")
        return LoaderItem(i, collate(samples, self.pad_token_id, keys=keys), skipped)

    # ------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        dataset = _RankMicroBatches(self, self.position)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=2 if self.num_workers else None, persistent_workers=False)
        for item in loader:
            if item.index != self.position:
                raise RuntimeError(f"loader out of order: got micro-batch {item.index}, expected {self.position}")
            self.position += 1
            if item.skipped:
                self.skipped += len(item.skipped)
                log.warning("dropped %d sample(s) from micro-batch %d: %s", len(item.skipped), item.index,
                            "; ".join(item.skipped))
            yield item.batch

    def state_dict(self) -> dict:
        return {"position": self.position, "skipped": self.skipped, "seed": self.seed, "num_slots": self.num_slots,
                "grad_accum": self.grad_accum, "manifest_created": self.manifest.get("created")}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position. Another split of the same global batch (rank count, accumulation, micro-batch)
        continues at the next whole step; another global batch or seed would change the samples: refused."""
        for key in ("seed", "num_slots"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {'global batch' if key == 'num_slots' else key}="
                                 f"{state[key]}, this loader has {getattr(self, key)}: the sample order would differ")
        steps = -(-int(state["position"]) // int(state["grad_accum"]))  # steps begun, rounded up to whole steps
        self.position = steps * self.grad_accum if state["grad_accum"] != self.grad_accum else int(state["position"])
        self.skipped = int(state.get("skipped", 0))
