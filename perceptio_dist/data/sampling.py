"""Which global sample indices a rank reads for a given optimizer step and micro-batch.

Global batch g of step s covers indices [s*G, (s+1)*G), G = micro x accum x ranks. Micro-batch m
of rank r takes the slice starting at (m * ranks + r) * micro. So one rank with accum=2 and two
ranks with accum=1 consume exactly the same samples per optimizer step, in the same grouping:
their gradients are equal, which is what the rank-count equivalence test relies on.
"""

from __future__ import annotations


def micro_batch_indices(step: int, micro: int, rank: int, world_size: int, micro_batch_size: int, grad_accum: int) -> range:
    if not 0 <= rank < world_size or not 0 <= micro < grad_accum:
        raise ValueError(f"rank {rank}/{world_size}, micro-batch {micro}/{grad_accum} out of range")
    global_batch = micro_batch_size * grad_accum * world_size
    start = step * global_batch + (micro * world_size + rank) * micro_batch_size
    return range(start, start + micro_batch_size)
