"""The LM-head part of the objective, computed from hidden states and the LM-head weight.

Terms (definitions in losses/objective.py): text, marker, count and z-loss, weighted and summed into
one scalar, plus the K depth-code logits at the code rows (the token and reconstruction terms are
built on those outside, with autograd through the VQ-VAE decoder).

Three implementations, one interface ``fn(hidden [P, d], weight [V, d], layout, weights) -> LMHeadTerms``:

* ``reference``: the full [P, V] logit matrix in fp32 and autograd. Ground truth for tests.
* ``fused_torch``: rows in chunks that never split a depth block; per chunk the fp32 logits, their
  log-sum-exp, target logit, code log-sum-exp, and at once the gradient of the weighted terms with
  respect to the logits (everything it needs is in the chunk: the count term's block sums included),
  which two matmuls turn into dH and dW. So the forward pass does the work of forward and backward
  (3 matmuls, like the reference) and never holds more than one chunk of logits; backward only scales
  by the upstream gradient and adds the code-logit part (K columns).
* ``fused_triton``: the same algorithm with the per-row softmax/statistics and the in-place gradient
  as Triton kernels (kernels/lm_head_triton.py); matmuls stay with cuBLAS. On GPUs by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .layout import TargetLayout, chunk_bounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMHeadWeights:
    text: float
    marker: float
    count: float
    z_loss: float


class LMHeadTerms(NamedTuple):
    total: torch.Tensor  # scalar: weighted sum of the four terms (with graph)
    text: torch.Tensor  # detached scalars, unweighted
    marker: torch.Tensor
    count: torch.Tensor
    z_loss: torch.Tensor
    code_logits: torch.Tensor  # [Pc, K] fp32 (with graph)


def _mean(values: torch.Tensor, count: int) -> torch.Tensor:
    return values.sum() / max(count, 1)


# ------------------------------------------------------------------------------ reference


def reference_lm_head_terms(hidden: torch.Tensor, weight: torch.Tensor, layout: TargetLayout, w: LMHeadWeights,
                            code_start: int, num_codes: int) -> LMHeadTerms:
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    lse = torch.logsumexp(logits, -1)
    ce = lse - logits.gather(1, layout.targets[:, None]).squeeze(1)
    code = logits[:, code_start : code_start + num_codes]
    mass = torch.exp(torch.logsumexp(code, -1) - lse)
    n, nb = layout.num_depth_tokens, layout.num_blocks
    if nb:
        spans = layout.block_starts[:, None] + torch.arange(n + 1, device=logits.device)[None]
        count = ((mass[spans].sum(-1) - n).abs() / n).mean()
    else:
        count = logits.sum() * 0.0
    text = _mean(ce[layout.is_text], int(layout.is_text.sum()))
    marker = _mean(ce[layout.is_marker], int(layout.is_marker.sum()))
    z = _mean(lse.pow(2), layout.num_rows)
    total = w.text * text + w.marker * marker + w.count * count + w.z_loss * z
    return LMHeadTerms(total, text.detach(), marker.detach(), count.detach(), z.detach(), code[layout.code_rows])


# ---------------------------------------------------------------------------------- fused


class RowOps(NamedTuple):
    """The per-row work on a chunk of logits, in torch or in Triton.

    ``stats(logits, targets, code_start, K) -> (lse, target_logit, code_lse, aux)`` may transform the
    logits in place (aux carries what ``grad_`` then needs); ``grad_(logits, targets, lse, code_lse, aux,
    a, b, c, code_start, K)`` leaves d loss / d logits in the buffer:
    ``a * softmax(row) - b * onehot(target) + c * softmax(row[codes])`` on the code columns.
    """

    stats: Callable
    grad_: Callable


def _torch_stats_(logits, targets, code_start, num_codes):
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    code = logits[:, code_start : code_start + num_codes].clone()
    row_max = logits.amax(1)
    torch.exp(logits - row_max[:, None], out=logits)  # one pass; the chunk now holds exp(s - max)
    lse = row_max + logits.sum(1).log()
    return lse, target_logit, torch.logsumexp(code, -1), (row_max, code)


def _torch_grad_(logits, targets, lse, code_lse, aux, a, b, c, code_start, num_codes):
    row_max, code = aux
    logits.mul_((a * torch.exp(row_max - lse))[:, None])  # a * softmax
    logits[:, code_start : code_start + num_codes].add_(c[:, None] * torch.exp(code - code_lse[:, None]))
    logits.scatter_add_(1, targets[:, None], -b[:, None])


TORCH_ROW_OPS = RowOps(_torch_stats_, _torch_grad_)


def triton_row_ops() -> RowOps:
    """The Triton kernels' row functions (imported on demand: triton is optional)."""
    from ..kernels.lm_head_triton import row_grad_, row_stats

    return RowOps(row_stats, row_grad_)


class _FusedLMHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, layout_tensors, meta):
        targets, is_text, is_marker, code_rows, block_starts = layout_tensors
        w, n, code_start, num_codes, bounds, ops, single_backward = meta
        p, compute = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        n_text, n_marker, nb = int(is_text.sum()), int(is_marker.sum()), int(block_starts.numel())
        in_block = torch.full((p,), -1, dtype=torch.long, device=hidden.device)
        for b, s in enumerate(block_starts.tolist()):
            in_block[s : s + n + 1] = b
        weight_c = weight.to(compute)
        grad_hidden = torch.empty(p, hidden.shape[1], dtype=compute, device=hidden.device)
        grad_weight = torch.zeros_like(weight_c)
        code_logits = torch.empty(p, num_codes, dtype=compute, device=hidden.device)
        sums = torch.zeros(4, dtype=torch.float64, device=hidden.device)  # text, marker, count, z
        per_ce = torch.zeros(p, dtype=compute, device=hidden.device)
        ce_scale = (is_text.to(compute) * (w.text / max(n_text, 1)) + is_marker.to(compute) * (w.marker / max(n_marker, 1)))
        for start, end in bounds:
            h = hidden[start:end].to(compute)
            logits = h @ weight_c.t()  # [c, V], the only chunk-sized buffer
            y = targets[start:end]
            code_logits[start:end] = logits[:, code_start : code_start + num_codes]
            lse, target_logit, code_lse, aux = ops.stats(logits, y, code_start, num_codes)
            per_ce[start:end] = lse - target_logit
            mass = torch.exp(code_lse - lse)
            blocks = in_block[start:end]
            c = torch.zeros_like(lse)
            if bool((blocks >= 0).any()):
                ids, local = torch.unique(blocks[blocks >= 0], return_inverse=True)
                expected = torch.zeros(ids.numel(), dtype=compute, device=h.device).index_add_(0, local, mass[blocks >= 0])
                sums[2] += ((expected - n).abs() / n).sum()
                slope = w.count * torch.sign(expected - n) / (n * nb)
                c[blocks >= 0] = slope[local] * mass[blocks >= 0]
            sums[3] += lse.double().pow(2).sum()
            b_coef = ce_scale[start:end]
            a_coef = b_coef + 2.0 * w.z_loss * lse / p - c
            ops.grad_(logits, y, lse, code_lse, aux, a_coef, b_coef, c, code_start, num_codes)
            grad_hidden[start:end] = logits @ weight_c
            grad_weight.addmm_(logits.t(), h)
            del logits
        sums[0] = per_ce[is_text].double().sum()
        sums[1] = per_ce[is_marker].double().sum()
        text, marker = sums[0] / max(n_text, 1), sums[1] / max(n_marker, 1)
        count = sums[2] / max(nb, 1)
        z = sums[3] / max(p, 1)
        total = (w.text * text + w.marker * marker + w.count * count + w.z_loss * z).to(compute)
        ctx.save_for_backward(grad_hidden, grad_weight, code_rows, hidden[code_rows].to(compute),
                              weight_c[code_start : code_start + num_codes].clone())
        ctx.meta = (code_start, num_codes, hidden.dtype, weight.dtype, single_backward)
        logged = [t.to(compute) for t in (text, marker, count, z)]
        ctx.mark_non_differentiable(*logged)
        return (total, *logged, code_logits[code_rows])

    @staticmethod
    def backward(ctx, g_total, _g_text, _g_marker, _g_count, _g_z, g_code):
        grad_hidden, grad_weight, code_rows, h_code, w_code = ctx.saved_tensors
        code_start, num_codes, hidden_dtype, weight_dtype, single_backward = ctx.meta
        if single_backward:
            # Scaled in place: the buffers prepared in forward become the gradients, no second V x d copy
            # (training runs one backward pass; gradcheck-style repeated passes use single_backward=False).
            dh, dw = grad_hidden.mul_(g_total), grad_weight.mul_(g_total)
        else:
            dh, dw = grad_hidden * g_total, grad_weight * g_total
        if g_code is not None and code_rows.numel():
            dh.index_add_(0, code_rows, g_code.to(dh.dtype) @ w_code)
            dw[code_start : code_start + num_codes] += g_code.to(dw.dtype).t() @ h_code
        return dh.to(hidden_dtype), dw.to(weight_dtype), None, None


def fused_lm_head_terms(hidden: torch.Tensor, weight: torch.Tensor, layout: TargetLayout, w: LMHeadWeights,
                        code_start: int, num_codes: int, chunk_size: int = 1024,
                        row_ops: RowOps = TORCH_ROW_OPS, single_backward: bool = True) -> LMHeadTerms:
    bounds = chunk_bounds(layout, chunk_size)
    tensors = (layout.targets, layout.is_text, layout.is_marker, layout.code_rows, layout.block_starts)
    meta = (w, layout.num_depth_tokens, code_start, num_codes, bounds, row_ops, single_backward)
    return LMHeadTerms(*_FusedLMHead.apply(hidden, weight, tensors, meta))


# ------------------------------------------------------------------------------- dispatch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_implementation(requested: str, device: torch.device) -> str:
    """'auto' -> fused_triton on CUDA when Triton imports, else fused_torch."""
    if requested == "auto":
        return "fused_triton" if device.type == "cuda" and triton_available() else "fused_torch"
    if requested == "fused_triton" and not triton_available():
        from ..config import ConfigError

        raise ConfigError("Config error at 'objective.implementation': fused_triton needs the triton package "
                          "(pip install '.[gpu]'); use 'auto' to fall back to fused_torch.")
    return requested


def lm_head_terms_fn(implementation: str, chunk_size: int) -> Callable:
    if implementation == "reference":
        return reference_lm_head_terms
    if implementation == "fused_torch":
        return lambda h, wt, layout, w, cs, k: fused_lm_head_terms(h, wt, layout, w, cs, k, chunk_size)
    if implementation == "fused_triton":
        return lambda h, wt, layout, w, cs, k: fused_lm_head_terms(h, wt, layout, w, cs, k, chunk_size, triton_row_ops())
    raise ValueError(f"unknown LM-head implementation {implementation!r}")
