"""The run's parallel layout as data: how many model replicas the ranks form, and where each rank sits (pipeline
stage, data-parallel replica, place in its tensor-parallel group). The one place this arithmetic is written; the
config's checks, DeepSpeed's config, the pipeline module and the strategies (hence the loader's data rank) read it.

Rank order follows DeepSpeed: a pipeline's stages are blocks of consecutive ranks (PipeDataParallelTopology: rank =
stage x replicas + replica); a tensor-parallel group is consecutive ranks (rank = replica x tp_size + tp_rank).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankPosition:
    stage: int  # pipeline stage (0 without a pipeline)
    data_rank: int  # the model replica whose micro-batches this rank reads
    tp_rank: int  # place in its tensor-parallel group (0 without one)


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    pp_stages: int = 1
    tp_size: int = 1

    def __post_init__(self):
        if self.world_size % self.pp_stages:
            raise ValueError(f"{self.world_size} ranks cannot be split into {self.pp_stages} pipeline stages of equal "
                             "size.")
        if self.world_size % self.tp_size:
            raise ValueError(f"{self.world_size} ranks cannot be split into tensor-parallel groups of "
                             f"{self.tp_size}.")

    @property
    def replicas(self) -> int:
        """Model replicas (data-parallel size): the ranks over pipeline stages and tensor-parallel groups."""
        return self.world_size // (self.pp_stages * self.tp_size)

    def position(self, rank: int) -> RankPosition:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        per_stage = self.world_size // self.pp_stages
        within_stage = rank % per_stage
        return RankPosition(stage=rank // per_stage, data_rank=within_stage // self.tp_size,
                            tp_rank=within_stage % self.tp_size)
