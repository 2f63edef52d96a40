"""Sequence packing: a micro-batch's samples laid out in few, evenly filled rows of at most ``max_tokens_per_row``
tokens (plan_rows), instead of one row per sample padded to the longest.

Packing changes only the layout, never which samples a micro-batch holds (data/loader.py decides that from the
step and the slot), so resume and rank equivalence stay exact. Each sample keeps what makes it independent:

* its own positions: ``position_ids`` restart at 0 where a sample starts. With ``attention_mask=None`` transformers
  reads those restarts as sequence boundaries (masking_utils.find_packed_sequence_indices) and builds a
  block-diagonal causal mask for SDPA or eager attention: attention never crosses samples. Flash-attention-2 reads
  the restarts (its varlen kernel) only in a batch of one row, so under it the model runs the rows as one
  flattened row (PerceptioModel.flatten_packed_rows);
* its own image tiles, ``[SEG]`` masks and depth blocks: concatenated in the order their tokens appear in the
  packed rows (row-major), the order in which the model and the objective read them;
* its own items in the objective: ``sample_index`` names the sample of every token (-1: padding), so per-sample text
  weighting and the ``[SEG]`` -> SAM2 image lookup follow samples, not rows, and no position predicts a token of
  another sample.

Padding at the end of a row gets positions 0, 1, ... too, so it forms a block of its own that no real token sees.
"""

from __future__ import annotations

import torch

from ..losses.layout import IGNORE_INDEX
from .batch import Batch, Sample, assemble


def _spread(lengths: list[int], order: list[int], count: int, budget: int) -> list[list[int]] | None:
    """Samples, longest first, each to the emptiest of ``count`` rows it fits (ties: the first); None if one fits none."""
    rows: list[list[int]] = [[] for _ in range(count)]
    fill = [0] * count
    for i in order:
        fits = [r for r in range(count) if fill[r] + lengths[i] <= budget]
        if not fits:
            return None
        r = min(fits, key=lambda k: (fill[k], k))
        rows[r].append(i)
        fill[r] += lengths[i]
    return [row for row in rows if row]


def _balance(rows: list[list[int]], lengths: list[int], budget: int) -> list[list[int]]:
    """Lower the fullest row, which sets the batch's width: move one of its samples to another row, or swap one with
    a shorter sample of another row, when that leaves both rows below its fill (the largest gain first; ties: the
    first found). Repeats until no move or swap helps; every change lowers the sum of squared fills, so it ends."""
    rows = [list(row) for row in rows]
    fill = [sum(lengths[i] for i in row) for row in rows]
    while True:
        top = max(range(len(rows)), key=lambda r: (fill[r], -r))
        best = None  # (new max of the two rows, row, sample out of top, sample out of row or None, tokens moved)
        for r in range(len(rows)):
            if r == top:
                continue
            for i in rows[top]:
                for j in [None, *rows[r]]:
                    moved = lengths[i] - (lengths[j] if j is not None else 0)
                    if moved <= 0 or fill[r] + moved > budget:
                        continue
                    worst = max(fill[top] - moved, fill[r] + moved)
                    if worst < fill[top] and (best is None or worst < best[0]):
                        best = (worst, r, i, j, moved)
        if best is None:
            return rows
        _, r, i, j, moved = best
        rows[top].remove(i)
        rows[r].append(i)
        if j is not None:
            rows[r].remove(j)
            rows[top].append(j)
        fill[top] -= moved
        fill[r] += moved


def plan_rows(lengths: list[int], max_tokens_per_row: int, extra_rows: int = 2) -> list[list[int]]:
    """Sample indices per row, rows as even as possible: a packed batch is as wide as its fullest row, so uneven rows
    are padding. From the fewest rows that can hold the tokens, R = ceil(total / budget), up to R + ``extra_rows``,
    samples are spread longest first (ties by index) to the emptiest row they fit, then balanced by moves and swaps
    out of the fullest row (_balance); the spread with the fewest positions (rows x fullest row; ties: fewer rows)
    wins. Rows in order of their first sample, samples in a row by index. Deterministic in the lengths alone."""
    too_long = [n for n in lengths if n > max_tokens_per_row]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit in data.max_tokens_per_row="
                         f"{max_tokens_per_row}")
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    count = max(1, -(-sum(lengths) // max_tokens_per_row))
    best, best_positions, last = None, None, None
    while last is None or count <= last:
        rows = _spread(lengths, order, count, max_tokens_per_row)
        if rows is not None:
            rows = _balance(rows, lengths, max_tokens_per_row)
            last = count + extra_rows if last is None else last  # the window opens at the first count that fits
            positions = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
            if best_positions is None or positions < best_positions:
                best, best_positions = rows, positions
        count += 1
        if count > len(lengths):
            break
    return sorted((sorted(row) for row in best), key=lambda row: row[0])


def pack(samples: list[Sample], max_tokens_per_row: int, pad_token_id: int,
         keys: list[str] | tuple[str, ...] = ()) -> Batch:
    """The packed micro-batch of ``samples`` (every per-sample field in packed order; ``keys`` follow)."""
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    rows = plan_rows([s.input_ids.numel() for s in samples], max_tokens_per_row)
    order = [i for row in rows for i in row]
    width = max(sum(samples[i].input_ids.numel() for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    sample_index = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    packed_position = {i: p for p, i in enumerate(order)}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            s, n = samples[i], samples[i].input_ids.numel()
            input_ids[r, start:start + n] = s.input_ids
            labels[r, start:start + n] = s.labels
            attention_mask[r, start:start + n] = 1
            sample_index[r, start:start + n] = packed_position[i]
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # padding: a block of its own
    return assemble([samples[i] for i in order], input_ids, attention_mask, labels, sample_index, position_ids,
                    keys=tuple(keys[i] for i in order) if keys else ())
