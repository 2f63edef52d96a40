"""Triton kernels for the fused LM-head terms: the per-row work on a chunk of fp32 logits.

``row_stats``: one program per row streams the vocabulary in blocks with an online max/sum
(log-sum-exp over all V columns), reads the target logit, and the log-sum-exp of the K code columns.
``row_grad_``: one program per row overwrites the logits with d loss / d logits,
``a * softmax(row) - b * onehot(target) + c * softmax(row[codes])`` on the code columns, in place.
The matmuls around them (logits, dH, dW) stay with cuBLAS, as in public fused-linear-CE kernels.
Any V, K and row count work (masked blocks); rows need not be a power of two.

The module exports two plain row functions with the signatures of ``losses.lm_head_terms.RowOps``
(``row_stats``, ``row_grad_``); the loss code wraps them, the kernels import nothing from it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, lse_ptr, target_ptr, code_lse_ptr, stride, vocab, code_start,
                      num_codes, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    # 64-bit: row * stride passes 2^31 once a chunk holds that many logits (e.g. 14k rows of a 152k vocabulary).
    base = logits_ptr + row.to(tl.int64) * stride
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))
    target = tl.load(targets_ptr + row)
    tl.store(target_ptr + row, tl.load(base + target).to(tl.float32))
    kcols = tl.arange(0, BLOCK_K)
    code = tl.load(base + code_start + kcols, mask=kcols < num_codes, other=-float("inf")).to(tl.float32)
    code_max = tl.max(code, 0)
    tl.store(code_lse_ptr + row, code_max + tl.log(tl.sum(tl.exp(code - code_max), 0)))


@triton.jit
def _row_grad_kernel(logits_ptr, targets_ptr, lse_ptr, code_lse_ptr, a_ptr, b_ptr, c_ptr, stride, vocab,
                     code_start, num_codes, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    # 64-bit: row * stride passes 2^31 once a chunk holds that many logits (e.g. 14k rows of a 152k vocabulary).
    base = logits_ptr + row.to(tl.int64) * stride
    lse = tl.load(lse_ptr + row)
    code_lse = tl.load(code_lse_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    c = tl.load(c_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_range = cols < vocab
        x = tl.load(base + cols, mask=in_range, other=0.0).to(tl.float32)
        grad = a * tl.exp(x - lse)
        is_code = (cols >= code_start) & (cols < code_start + num_codes)
        grad += tl.where(is_code, c * tl.exp(x - code_lse), 0.0)
        grad -= tl.where(cols == target, b, 0.0)
        tl.store(base + cols, grad, mask=in_range)


def row_stats(logits: torch.Tensor, targets: torch.Tensor, code_start: int, num_codes: int):
    rows, vocab = logits.shape
    lse, target, code_lse = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if rows:
        _row_stats_kernel[(rows,)](logits, targets, lse, target, code_lse, logits.stride(0), vocab, code_start,
                                   num_codes, BLOCK=BLOCK_V, BLOCK_K=triton.next_power_of_2(num_codes))
    return lse.to(logits.dtype), target.to(logits.dtype), code_lse.to(logits.dtype), None


def row_grad_(logits, targets, lse, code_lse, _aux, a, b, c, code_start, num_codes):
    rows, vocab = logits.shape
    if rows:
        f32 = [t.float().contiguous() for t in (lse, code_lse, a, b, c)]
        _row_grad_kernel[(rows,)](logits, targets, *f32, logits.stride(0), vocab, code_start, num_codes,
                                  BLOCK=BLOCK_V)

