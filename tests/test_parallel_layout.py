"""The parallel layout (parallel/layout.py): where every rank sits, against DeepSpeed's own pipeline topology and by
hand for tensor-parallel groups, and the config errors for ranks that do not divide."""

from __future__ import annotations

import pytest

from perceptio_dist.config import ConfigError
from perceptio_dist.config.training import load_config
from perceptio_dist.parallel.layout import ParallelLayout, RankPosition


@pytest.mark.parametrize("world,stages", [(4, 2), (8, 2), (8, 4), (6, 3), (2, 1)])
def test_pipeline_positions_are_deepspeeds(world, stages):
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    layout = ParallelLayout(world, pp_stages=stages)
    topology = PipeDataParallelTopology(num_pp=stages, num_dp=layout.replicas)
    assert layout.replicas == world // stages
    for rank in range(world):
        coord = topology.get_coord(rank)
        assert layout.position(rank) == RankPosition(stage=coord.pipe, data_rank=coord.data, tp_rank=0)


def test_tensor_parallel_groups_are_consecutive_ranks_by_hand():
    layout = ParallelLayout(8, tp_size=2)
    assert layout.replicas == 4
    assert [layout.position(r) for r in (0, 1, 2, 5, 7)] == [
        RankPosition(0, 0, 0), RankPosition(0, 0, 1), RankPosition(0, 1, 0), RankPosition(0, 2, 1),
        RankPosition(0, 3, 1)]
    assert ParallelLayout(3).position(2) == RankPosition(0, 2, 0)  # plain data parallelism: every rank a replica


def test_ranks_that_do_not_divide_are_config_errors():
    cfg = load_config("tiny_cpu", ["parallel.mode=pipeline", "parallel.pp_stages=2", "parallel.zero_stage=1"])
    assert cfg.parallel.layout(4).replicas == 2
    with pytest.raises(ConfigError, match="'parallel.pp_stages': 3 ranks cannot be split into 2 pipeline stages"):
        cfg.parallel.layout(3)
    with pytest.raises(ValueError, match="outside a world of 4"):
        ParallelLayout(4).position(4)
