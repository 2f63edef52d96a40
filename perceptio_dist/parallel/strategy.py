"""Parallel strategies: how the model is spread over the ranks and how one optimizer step runs.

The trainer holds one :class:`ParallelStrategy` and never branches on ``parallel.mode``:

* :class:`ZeroStrategy` (``mode: zero``): every rank a data-parallel replica of the whole model under
  ZeRO-2/3. A step is ``grad_accum_steps`` micro-batches of forward, an agreement on finiteness, backward
  and ``engine.step()``. A micro-batch that is not finite on some rank is skipped by every rank: it gets a
  zero backward (no gradient; DeepSpeed's accumulation count stays in step) and is not replaced, so every
  later step reads the samples an uninterrupted run reads.
* :class:`PipelineStrategy` (``mode: pipeline``): a DeepSpeed ``PipelineModule`` (parallel/pipeline.py), a
  step is ``engine.train_batch``. A non-finite loss is only known after the update, so it is counted.

Both read a step's micro-batches before its first forward, count the items each term of the objective
scores (losses/normalise.py), sum the counts over the data-parallel replicas and give the objective the
step's :class:`StepNormaliser`: every term is then the mean over the step's items, and the loss DeepSpeed
optimises and reports is exactly that. (A skipped micro-batch's items stay in the step's counts: they are
fixed before the first backward.)

Each owns building the module DeepSpeed wraps, the engine, one step, the stage layout it reports and the
layout check of a checkpoint it is asked to resume. Non-finite losses are reported to a ``guard`` (the
trainer's: it counts, and stops the run after too many in a row).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from ..config.training import PerceptioConfig
from ..losses.lm_head_module import LMHeadTermsModule
from ..losses.objective import TERMS, PerceptioObjective, StepNormaliser
from ..model.perceptio import PerceptioModel
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, any_rank

# What a layout check compares (with the defaults a checkpoint saved before a field existed had).
LAYOUT_DEFAULTS = {"mode": "zero", "pp_stages": 1, "pp_partition": "parameters", "pp_layers_per_stage": None,
                   "tp_size": 1}
LAYOUT_FIELDS = ("mode", "pp_stages", "pp_partition", "pp_layers_per_stage", "zero_stage", "tp_size")


class NonfiniteGuard(Protocol):
    def finite(self) -> None: ...

    def nonfinite(self, step: int, update_applied: bool) -> None: ...  # may raise to stop the run


@dataclass
class StepResult:
    loss: float  # mean loss of the step over every rank (what the engine optimised)
    records: list[tuple[torch.Tensor, torch.Tensor]]  # this rank's (terms, counts) per scored micro-batch
    batches: list = field(default_factory=list)  # this rank's batches to count as work (each sample once)
    item_counts: list[float] = field(default_factory=list)  # the step's items per term (TERMS order), all ranks


class ParallelStrategy:
    """Base: what both modes share, among it the rank's place in the parallel layout (parallel/layout.py)."""

    mode = ""

    def __init__(self, cfg: PerceptioConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.layout_of_ranks = cfg.parallel.layout(dist.world_size)
        where = self.layout_of_ranks.position(dist.rank)
        self.stage, self.data_rank, self.tp_rank = where.stage, where.data_rank, where.tp_rank
        self.data_ranks = self.layout_of_ranks.replicas
        self.engine = None
        self.objective: PerceptioObjective | None = None  # set by wrap(); each step runs normalised_by its counts

    @property
    def reads_batches(self) -> bool:
        """Whether this rank needs the micro-batches (a pipeline's middle stages receive activations only)."""
        return True

    @property
    def counts_items(self) -> bool:
        """Whether this rank's micro-batches count in the step normaliser: one rank per replica would do, but every
        rank of a tensor-parallel group reads the same ones, so all count and the sum is divided by the group."""
        return True

    def counting_ranks_per_replica(self) -> int:
        return self.dist.world_size // self.data_ranks

    def read_step(self, batches: Iterator) -> tuple[list, StepNormaliser]:
        """The step's micro-batches of this rank (none where it :attr:`reads_batches` not), read before its first
        forward, and the step's normaliser (the objective's item counts over every replica's micro-batches), which
        the step's forwards run under."""
        accum, device = self.cfg.train.grad_accum_steps, self.dist.device
        micro_batches = [next(batches).to(device) for _ in range(accum)] if self.reads_batches else []
        counted = micro_batches if self.counts_items else []
        counts = all_reduce_sum(self.objective.step_counts(counted, device)) / self.counting_ranks_per_replica()
        return micro_batches, StepNormaliser(counts.cpu(), scale=float(accum * self.data_ranks))

    # ------------------------------------------------------------------------------------------ build

    def model_construction(self, ds_config: dict):
        """Context in which the model is built (ZeRO-3: already partitioned)."""
        return contextlib.nullcontext()

    def wrap(self, model: PerceptioModel, objective: PerceptioObjective, lm_head_terms: LMHeadTermsModule) -> nn.Module:
        raise NotImplementedError

    def initialize(self, module: nn.Module, optimizer, scheduler, ds_config: dict):
        """DeepSpeed's engine around ``module``; returns (engine, scheduler)."""
        import deepspeed

        from .placement import check_placement, place_unmanaged

        # DeepSpeed does not move the buffers of a ZeRO-3 model built with zero.Init (placement.py says why).
        place_unmanaged(module, self.dist.device)
        self.engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
        check_placement(self.engine.module, self.dist.device)
        return self.engine, scheduler

    # ------------------------------------------------------------------------------------------ steps

    def step(self, batches: Iterator, on_batch: Callable, guard: NonfiniteGuard, step: int) -> StepResult:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ facts

    def layout(self) -> list[dict] | None:
        """Per pipeline stage: layers, kinds and parameter count (None without stages)."""
        return None

    def describe(self) -> str:
        return ""

    def resume_differences(self, saved_parallel: dict, saved_world_size: int) -> list[str]:
        """Why a checkpoint saved with ``saved_parallel`` on ``saved_world_size`` ranks cannot resume here (empty: it
        can). Pipeline and tensor-parallel checkpoints (per-stage layer files or per-rank weight shards, per-rank
        optimizer partitions) resume only as saved."""
        sharded = (saved_parallel.get("mode", "zero") == "pipeline" or self.mode == "pipeline"
                   or saved_parallel.get("tp_size", 1) > 1 or self.cfg.parallel.tp_size > 1)
        if not sharded:
            return []  # ZeRO checkpoints resume on any rank count (universal format)
        current = dataclasses.asdict(self.cfg.parallel)
        diffs = [f"parallel.{k}: checkpoint {saved_parallel.get(k, LAYOUT_DEFAULTS.get(k))!r}, now {current[k]!r}"
                 for k in LAYOUT_FIELDS if saved_parallel.get(k, LAYOUT_DEFAULTS.get(k)) != current[k]]
        if saved_world_size != self.dist.world_size:
            diffs.append(f"ranks: checkpoint {saved_world_size}, now {self.dist.world_size}")
        return diffs


class ZeroStrategy(ParallelStrategy):
    """Also tensor parallelism (parallel.tp_size > 1, DeepSpeed AutoTP on the LLM, parallel/deepspeed_config.py):
    DeepSpeed's mesh puts a tensor-parallel group on consecutive ranks, so rank r is data-parallel replica
    r // tp_size; every rank of a group reads the same micro-batches, and only its first rank's records and batches
    count (the group computes one replica's loss together)."""

    mode = "zero"

    def model_construction(self, ds_config: dict):
        from .zero import partitioned_construction

        par = self.cfg.parallel
        return partitioned_construction(ds_config, enabled=par.zero_stage == 3 and par.zero_init)

    def wrap(self, model, objective, lm_head_terms):
        from .zero import PerceptioTrainingModule, register_external_parameters

        module = PerceptioTrainingModule(model, objective, lm_head_terms)
        self.objective = objective
        if self.cfg.parallel.zero_stage == 3:
            register_external_parameters(module.external_parameters())
        return module

    def describe(self) -> str:
        tp = self.cfg.parallel.tp_size
        return f"tensor parallel {tp} x {self.data_ranks} replicas, " if tp > 1 else ""

    def step(self, batches, on_batch, guard, step):
        engine, device, accum = self.engine, self.dist.device, self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros(1, device=device)
        micro_batches, normaliser = self.read_step(batches)
        result = StepResult(0.0, [], item_counts=normaliser.counts.tolist())
        with self.objective.normalised_by(normaliser):
            for micro, batch in enumerate(micro_batches):
                on_batch(batch, micro)
                loss, terms, counts = engine(**batch.as_dict())
                if any_rank(not bool(torch.isfinite(loss.detach()).all()), device):
                    guard.nonfinite(step, update_applied=False)  # may stop the run
                    # No gradient from this micro-batch on any rank, but DeepSpeed still counts it, so the update
                    # happens where it would have and later steps read their planned samples.
                    engine.backward(torch.zeros((), device=device, requires_grad=True) * 1.0)  # a graph, no param
                    engine.step()
                    continue
                guard.finite()
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
                if self.tp_rank == 0:
                    result.records.append((terms, counts))
                    result.batches.append(batch)
        # DeepSpeed optimises the mean of the micro-batch totals over accumulation steps and replicas; with the
        # step normaliser's scale that mean is the step's objective.
        result.loss = all_reduce_mean(loss_sum / accum).item()
        return result


class PipelineStrategy(ParallelStrategy):
    mode = "pipeline"

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        self.last_stage = self.stage == cfg.parallel.pp_stages - 1
        self.stage_loss = None
        self._layout: list[dict] | None = None

    @property
    def reads_batches(self) -> bool:
        """The first stage embeds the inputs and the last scores the labels; DeepSpeed's schedule loads micro-batches
        on those two only, so the stages between read (and build) none."""
        return self.stage == 0 or self.last_stage

    @property
    def counts_items(self) -> bool:
        return self.last_stage  # the stage whose loss the counts normalise

    def counting_ranks_per_replica(self) -> int:
        return 1

    def wrap(self, model, objective, lm_head_terms):
        from .pipeline import build_pipeline_module

        module, self.stage_loss = build_pipeline_module(self.cfg, model, objective, lm_head_terms,
                                                        self.dist.world_size)
        self.objective = objective
        self._layout = self._stage_layout(module)
        return module

    def _stage_layout(self, module) -> list[dict]:
        """Per stage: its layers (pipeline layer indices and kinds) and parameter count, agreed by every rank."""
        from .pipeline import layer_kinds

        stages = self.cfg.parallel.pp_stages
        counts = torch.zeros(stages, dtype=torch.float64, device=self.dist.device)
        if self.data_rank == 0:
            counts[self.stage] = float(sum(p.numel() for p in module.parameters()))
        counts = all_reduce_sum(counts).tolist()
        kinds = layer_kinds(self.cfg.model.backbone.text.num_layers, bool(module.tied_modules))
        return [{"stage": s, "layers": [int(module.parts[s]), int(module.parts[s + 1]) - 1],
                 "kinds": kinds[module.parts[s]:module.parts[s + 1]], "parameters": int(counts[s])}
                for s in range(stages)]

    def step(self, batches, on_batch, guard, step):
        """DeepSpeed's schedule: every micro-batch's forward and backward, then the update. The first and the last
        stage of a replica both read the micro-batches; only the last stage's records and batches count."""
        from .pipeline import pipeline_batches

        read = []

        def read_one(batch):
            on_batch(batch, len(read))
            read.append(batch)

        micro_batches, normaliser = self.read_step(batches)
        with self.objective.normalised_by(normaliser):
            loss = float(self.engine.train_batch(pipeline_batches(iter(micro_batches), read_one)))  # every rank's
        if np.isfinite(loss):
            guard.finite()
        else:
            guard.nonfinite(step, update_applied=True)
        return StepResult(loss, self.stage_loss.take_records(), read if self.last_stage else [],
                          normaliser.counts.tolist())

    def layout(self):
        return self._layout

    def describe(self) -> str:
        stages = self.cfg.parallel.pp_stages
        return f"pipeline of {stages} stages x {self.dist.world_size // stages} replicas, "


STRATEGIES = {"zero": ZeroStrategy, "pipeline": PipelineStrategy}


def build_strategy(cfg: PerceptioConfig, dist: DistInfo) -> ParallelStrategy:
    return STRATEGIES[cfg.parallel.mode](cfg, dist)
