"""Streaming, task-mixing, exactly resumable loader over preprocessed shards (a folder or a URL).

Slots. One optimizer step reads a global batch of G = ranks x grad_accum x micro samples; sample j of the
global batch comes from *slot* j. Rank r's micro-batch m of step k holds slots (m * ranks + r) * micro + b for
b < micro. Which sample slot j of step k reads is pure arithmetic on (seed, G, k, j) (data/sampling.py), not on
how G is split:

* resuming is exact: the state is the number of micro-batches a rank has consumed;
* one rank with accumulation 2 and two ranks with accumulation 1 read the same samples each step;
* an elastic resume (another rank count or accumulation, same G) continues with the same samples;
* epochs are global per task: within an epoch of a task every sample is read exactly once over all slots;
* DataLoader workers split a rank's micro-batches round-robin; each builds whole micro-batches.

Samples are read one at a time from their tar (data/shard_access.py): a worker keeps a few shards open (file
handle and member index), never whole shards in memory. A sample that fails to read or decode, or is too long,
is dropped from its micro-batch (which gets smaller) and counted: the batch composition stays a function of the
index, so resume stays exact. With packing (``max_tokens_per_row``) a micro-batch holds the same samples, laid
out in packed rows (data/packing.py) instead of one padded row each. A shard that does not match the manifest stops the run (data.damaged_shards:
stop) or has its samples dropped and counted (skip). A micro-batch whose samples all fail stops the run with an
error (every rank must take part in every step).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from .batch import Batch, collate
from .packing import pack
from .sampling import GlobalSampler, SampleRef
from .shard_access import DamagedShardError, OpenShards, ShardProblem, ShardStore, damaged_message

log = logging.getLogger(__name__)


@dataclass
class LoaderItem:
    index: int  # this rank's micro-batch number
    batch: Batch
    skipped: list[str]  # keys dropped, with reasons
    fatal: str = ""  # a damaged shard under data.damaged_shards=stop: the message the run stops with


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
                 grad_accum: int, micro_batch_size: int, builder, num_workers: int = 0, pad_token_id: int = 0,
                 shuffle_window: int = 4, damaged_shards: str = "stop", verify: str = "size",
                 cache_dir: str | Path | None = None, max_tokens_per_row: int | None = None,
                 curriculum: list[tuple[int, dict[str, float]]] = ()):
        self.store = ShardStore(folder, cache_dir, verify)
        self.folder = self.store.location
        self.manifest = self.store.manifest
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.grad_accum, self.micro_batch_size, self.num_workers = grad_accum, micro_batch_size, num_workers
        self.builder, self.pad_token_id, self.damaged_shards = builder, pad_token_id, damaged_shards
        self.max_tokens_per_row = max_tokens_per_row  # None: padded micro-batches
        self.num_slots = world_size * grad_accum * micro_batch_size  # the global batch
        shards: dict[str, list[dict]] = {}
        for s in self.manifest["shards"]:
            if s["num_samples"]:
                shards.setdefault(s["task"], []).append(s)
        weightings = [weights for _, weights in curriculum] + [task_weights]
        for weights in weightings:
            if not any(w > 0 and t in shards for t, w in weights.items()):
                raise ValueError(f"none of the weighted tasks {sorted(weights)} has samples in {self.folder}")
        self.tasks = sorted({t for weights in weightings for t, w in weights.items() if w > 0 and t in shards})
        for task in self.tasks:
            total = sum(s["num_samples"] for s in shards[task])
            if total < self.num_slots:
                raise ValueError(f"task {task} has {total} samples in {self.folder}, fewer than the global batch of "
                                 f"{self.num_slots}: give it weight 0 or more data")
        self.weights = self._normalised(task_weights)
        self.shards = shards
        self.sampler = GlobalSampler(self.tasks, self.weights, {t: [s["num_samples"] for s in shards[t]]
                                                                for t in self.tasks}, seed, self.num_slots,
                                     shuffle_window, [(until, self._normalised(w)) for until, w in curriculum])
        # A step reads one window of shards per task (two at a boundary); one more absorbs the turnover.
        self.max_open_shards = (2 * shuffle_window + 1) * len(self.tasks)
        self.known_bad = self._check_sizes([s for t in self.tasks for s in shards[t]])
        self._open: OpenShards | None = None
        self._open_pid = -1
        self.position = 0  # micro-batches consumed by this rank
        self.skipped = 0

    def _normalised(self, task_weights: dict[str, float]) -> np.ndarray:
        """Sampling probabilities over self.tasks (a task without samples is never drawn)."""
        weights = np.array([task_weights.get(t, 0.0) for t in self.tasks], dtype=np.float64)
        return weights / weights.sum()

    def _check_sizes(self, entries: list[dict]) -> dict[str, str]:
        """Every rank stats every local shard at start: a truncated copy stops the run before the first step."""
        problems = self.store.check_sizes(entries)
        if problems and self.damaged_shards == "stop":
            entry, problem = problems[0]
            more = f" ({len(problems) - 1} more shards are damaged too)" if len(problems) > 1 else ""
            raise DamagedShardError(damaged_message(entry["path"], self.folder, problem, entry["num_samples"]) + more)
        for entry, problem in problems:
            log.warning("skipping damaged shard %s (%s): its %d samples are dropped and counted",
                        entry["path"], problem, entry["num_samples"])
        return {entry["path"]: problem for entry, problem in problems}

    def _open_shards(self) -> OpenShards:
        if self._open is None or self._open_pid != os.getpid():  # each DataLoader worker opens its own files
            self._open = OpenShards(self.store, self.max_open_shards)
            self._open.bad.update(self.known_bad)
            self._open_pid = os.getpid()
        return self._open

    # ---------------------------------------------------------------- pure functions of the index

    def slots_and_step(self, i: int) -> tuple[list[int], int]:
        """Rank-local micro-batch i -> (the global-batch slots it holds, the step)."""
        step, micro = divmod(i, self.grad_accum)
        first = (micro * self.world_size + self.rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size)), step

    def sample_refs(self, i: int) -> list[SampleRef]:
        slots, step = self.slots_and_step(i)
        return [self.sampler.draw(step, slot) for slot in slots]

    def micro_batch(self, i: int) -> LoaderItem:
        samples, keys, skipped = [], [], []
        shards = self._open_shards()
        for ref in self.sample_refs(i):
            entry = self.shards[ref.task][ref.shard]
            try:
                raw = shards.sample(entry, ref.index)
            except ShardProblem as exc:
                if self.damaged_shards == "stop":
                    return LoaderItem(i, None, skipped, fatal=damaged_message(entry["path"], self.folder, str(exc),
                                                                                entry["num_samples"]))
                skipped.append(f"{entry['path']}#{ref.index}: damaged shard ({exc})")
                continue
            except Exception as exc:  # a malformed member: this sample only
                skipped.append(f"{entry['path']}#{ref.index}: {type(exc).__name__}: {exc}")
                continue
            try:
                samples.append(self.builder(raw))
                keys.append(raw.key)
            except Exception as exc:  # corrupt or too long: dropped and counted, never fatal
                skipped.append(f"{raw.key}: {type(exc).__name__}: {exc}")
        if not samples:
            raise RuntimeError(f"every sample of micro-batch {i} failed ({'; '.join(skipped)}): the shards in "
                               f"{self.folder} look damaged, or data.max_seq_len is too small")
        if self.max_tokens_per_row is None:
            return LoaderItem(i, collate(samples, self.pad_token_id, keys=keys), skipped)
        return LoaderItem(i, pack(samples, self.max_tokens_per_row, self.pad_token_id, keys=keys), skipped)

    # ------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        dataset = _RankMicroBatches(self, self.position)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=2 if self.num_workers else None, persistent_workers=False)
        for item in loader:
            if item.fatal:
                raise DamagedShardError(item.fatal)
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
        names = {"seed": "data.seed", "num_slots": "the global batch (samples per optimizer step)"}
        changed = [f"{names[key]} was {state[key]}, now {getattr(self, key)}" for key in names
                   if state[key] != getattr(self, key)]
        if changed:
            raise ConfigError(
                f"Config error at 'checkpoint.resume': the checkpoint cannot continue with this data order "
                f"({'; '.join(changed)}). The samples a step reads follow from data.seed and the global batch, so "
                "the resumed run would not read what the interrupted one would have. Resume with the values the "
                "run was started with (another split of the same global batch over ranks, micro-batch and "
                "accumulation is fine), or start a new run in another folder (logging.output_dir) to use the new "
                "values.")
        steps = -(-int(state["position"]) // int(state["grad_accum"]))  # steps begun, rounded up to whole steps
        self.position = steps * self.grad_accum if state["grad_accum"] != self.grad_accum else int(state["position"])
        self.skipped = int(state.get("skipped", 0))
