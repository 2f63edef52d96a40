"""Where each term of the objective looks: the categories of the target positions and the depth blocks.

Rows are the positions that predict a target (labels shifted by one, ignore positions removed), in
row-major order. A depth block's *span* is the N rows predicting its codes plus the row predicting
``<DEPTH_END>``: consecutive rows, because an assistant turn is wholly a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.spatial_tokens import SpatialTokenIds

IGNORE_INDEX = -100


@dataclass
class TargetLayout:
    targets: torch.Tensor  # [P] token ids
    is_text: torch.Tensor  # [P] bool: answer tokens that are not spatial
    is_marker: torch.Tensor  # [P] bool: [SEG], <DEPTH_START>, <DEPTH_END>
    code_rows: torch.Tensor  # [Pc] rows whose target is a depth code, in order
    block_starts: torch.Tensor  # [nb] first row of each block's span (predicts the first code)
    num_depth_tokens: int  # N
    text_weights: torch.Tensor | None = None  # [P] weight of each row's text cross-entropy; None: all 1

    @property
    def num_rows(self) -> int:
        return int(self.targets.numel())

    @property
    def num_blocks(self) -> int:
        return int(self.block_starts.numel())

    @property
    def span_length(self) -> int:
        return self.num_depth_tokens + 1

    def block_code_rows(self) -> torch.Tensor:
        """[nb, N] indices into ``code_rows`` order (every code row belongs to exactly one block)."""
        n = self.num_depth_tokens
        return torch.arange(self.num_blocks * n, device=self.targets.device).view(self.num_blocks, n)


def build_layout(targets: torch.Tensor, ids: SpatialTokenIds) -> TargetLayout:
    """Categorise the rows and locate ``<DEPTH_START> N codes <DEPTH_END>``; a malformed block is a data error."""
    n = ids.num_depth_tokens
    is_code = (targets >= ids.code_start) & (targets < ids.code_end)
    is_marker = (targets == ids.seg) | (targets == ids.depth_start) | (targets == ids.depth_end)
    starts = (targets == ids.depth_start).nonzero(as_tuple=True)[0]
    if starts.numel():
        span = starts[:, None] + torch.arange(1, n + 2, device=targets.device)[None]  # N codes then the end
        if int(span.max()) >= targets.numel():
            raise ValueError("a depth block runs past the end of the targets: expected N codes and <DEPTH_END>")
        codes = targets[span[:, :n]]
        if not bool(((codes >= ids.code_start) & (codes < ids.code_end)).all()):
            raise ValueError(f"a depth block does not hold exactly N={n} depth codes after <DEPTH_START>")
        if not bool((targets[span[:, n]] == ids.depth_end).all()):
            raise ValueError(f"a depth block is not closed by <DEPTH_END> after N={n} codes")
    if int((targets == ids.depth_end).sum()) != starts.numel():
        raise ValueError("<DEPTH_END> without a matching <DEPTH_START>")
    if int(is_code.sum()) != starts.numel() * n:
        raise ValueError("a depth code outside a <DEPTH_START> ... <DEPTH_END> block")
    return TargetLayout(
        targets=targets, is_text=~(is_code | is_marker), is_marker=is_marker,
        code_rows=is_code.nonzero(as_tuple=True)[0], block_starts=starts + 1, num_depth_tokens=n,
    )


def chunk_bounds(layout: TargetLayout, chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_size`` that never split a block's span (the count term needs whole spans)."""
    spans = [(int(s), int(s) + layout.span_length) for s in layout.block_starts.tolist()]  # [start, end)
    bounds, start, p = [], 0, layout.num_rows
    i = 0
    while start < p:
        end = min(start + chunk_size, p)
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        for s, e in spans[i:]:
            if s >= end:
                break
            if s < end < e:  # the cut falls inside this span: end before it, or after it if it starts here
                end = s if s > start else e
                break
        bounds.append((start, end))
        start = end
    return bounds
