"""The LM-head part of the objective, computed from hidden states and the LM-head weight.

Terms (definitions in losses/objective.py): text, marker, count and z-loss, weighted and summed into
one scalar, plus the K depth-code logits at the code rows (the token and reconstruction terms are
built on those outside, with autograd through the VQ-VAE decoder).

Three implementations, one interface ``fn(hidden [P, d], weight [V, d], layout, weights) -> LMHeadTerms``:

* ``reference``: the full [P, V] logit matrix in fp32 and autograd. Ground truth for tests.
* ``fused_torch``: rows in chunks that never split a depth block; per chunk the fp32 logits, their
  log-sum-exp, target logit, code log-sum-exp, and at once the gradient of the weighted terms with
  respect to the logits (every term is a sum of per-row values, so everything it needs is in the
  chunk), which two matmuls turn into dH and dW. So the forward pass does the work of forward and backward
  (3 matmuls, like the reference) and never holds more than one chunk of logits; backward only scales
  by the upstream gradient and adds the code-logit part (K columns).
* ``fused_triton``: the same algorithm with the per-row softmax/statistics and the in-place gradient
  as Triton kernels (kernels/lm_head_triton.py); matmuls stay with cuBLAS. On GPUs by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .layout import TargetLayout, chunk_bounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMHeadWeights:
    """Term weights, and what each term's sum is divided by (losses/normalise.py). A denominator left None is
    the call's own item count (text: the sum of its text-row weights), i.e. a mean over these rows alone."""

    text: float
    marker: float
    count: float
    z_loss: float
    text_denominator: float | None = None
    marker_denominator: float | None = None
    count_denominator: float | None = None  # depth blocks
    z_denominator: float | None = None  # target rows

    def denominators(self, layout: TargetLayout, text_weights: torch.Tensor) -> tuple[float, float, float, float]:
        local = (float(text_weights[layout.is_text].sum()), float(layout.is_marker.sum()), float(layout.num_blocks),
                 float(layout.num_rows))
        given = (self.text_denominator, self.marker_denominator, self.count_denominator, self.z_denominator)
        return tuple(g if g is not None else max(v, 1.0) for g, v in zip(given, local))


# The count term scores the code mass m of a row by -log m or -log(1 - m). Its gradient on the logits,
# k (softmax - softmax_C) with k = -m / (1 - m) on the end row, is two large terms that cancel as m -> 1; in fp32
# that cancellation is exact enough only up to k ~ 1e4. So m is saturated at 1 - 1e-4: beyond it the row's count
# term is constant (zero gradient, in every back end; the marker term still pushes <DEPTH_END> up there).
MAX_LOG_CODE_MASS = math.log1p(-1e-4)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def count_roles(layout: TargetLayout) -> torch.Tensor:
    """Per row: 1 where the count term wants the code mass (a block's N code rows), 2 where it wants none (the
    row predicting <DEPTH_END>), 0 elsewhere."""
    roles = torch.zeros(layout.num_rows, dtype=torch.long, device=layout.targets.device)
    roles[layout.code_rows] = 1
    roles[layout.block_starts + layout.num_depth_tokens] = 2
    return roles


def text_weights_of(layout: TargetLayout, dtype: torch.dtype) -> torch.Tensor:
    w = layout.text_weights
    return torch.ones(layout.num_rows, dtype=dtype, device=layout.targets.device) if w is None else w.to(dtype)


class LMHeadTerms(NamedTuple):
    total: torch.Tensor  # scalar: weighted sum of the four terms (with graph)
    text: torch.Tensor  # detached scalars, unweighted
    marker: torch.Tensor
    count: torch.Tensor
    z_loss: torch.Tensor
    code_logits: torch.Tensor  # [Pc, K] fp32 (with graph)


# ------------------------------------------------------------------------------ reference


def reference_lm_head_terms(hidden: torch.Tensor, weight: torch.Tensor, layout: TargetLayout, w: LMHeadWeights,
                            code_start: int, num_codes: int) -> LMHeadTerms:
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    lse = torch.logsumexp(logits, -1)
    ce = lse - logits.gather(1, layout.targets[:, None]).squeeze(1)
    code = logits[:, code_start : code_start + num_codes]
    log_mass = (torch.logsumexp(code, -1) - lse).clamp_max(MAX_LOG_CODE_MASS)
    row_weight = text_weights_of(layout, dtype)
    text_den, marker_den, count_den, z_den = w.denominators(layout, row_weight)
    roles = count_roles(layout)
    n = layout.num_depth_tokens
    count_rows = torch.where(roles == 1, -log_mass, torch.where(roles == 2, -log1mexp(log_mass), 0.0 * log_mass))
    count = count_rows.sum() / (n + 1) / count_den
    text = (row_weight * ce)[layout.is_text].sum() / text_den
    marker = ce[layout.is_marker].sum() / marker_den
    z = lse.pow(2).sum() / z_den
    total = w.text * text + w.marker * marker + w.count * count + w.z_loss * z
    return LMHeadTerms(total, text.detach(), marker.detach(), count.detach(), z.detach(), code[layout.code_rows])


# ---------------------------------------------------------------------------------- fused

LM_HEAD_MATMULS = ("fp32", "tf32", "bf16")


class LMHeadMatmul:
    """The precision of the fused back ends' three GEMMs (logits, dH, dW); the statistics stay in fp32.

    * ``fp32``: plain fp32 GEMMs.
    * ``tf32``: fp32 GEMMs with TF32 tensor cores allowed, for these GEMMs only (on the CPU: plain fp32).
    * ``bf16``: operands rounded to bf16, products accumulated and returned in fp32 (cuBLAS's bf16-in/fp32-out
      GEMM on GPUs; on the CPU the same numbers from fp32 GEMMs on the rounded operands, whose products are exact
      in fp32).

    Inputs in fp64 (tests) ignore it: fp64 stays exact.
    """

    def __init__(self, precision: str = "fp32"):
        if precision not in LM_HEAD_MATMULS:
            raise ValueError(f"unknown LM-head matmul precision {precision!r} (one of {', '.join(LM_HEAD_MATMULS)})")
        self.precision = precision

    def operand(self, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """``x`` as this precision's GEMM operand (the weight is converted once per call, not per chunk)."""
        return x.to(torch.bfloat16) if self.precision == "bf16" and compute == torch.float32 else x.to(compute)

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
        """a @ b in fp32 (fp64 for fp64 operands), written into ``out`` (added to it when ``accumulate``)."""
        if self.precision == "bf16" and a.dtype != torch.float64:
            a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
            # A temporary of the output's size: torch has no in-place bf16-in/fp32-out addmm.
            result = torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.float() @ b.float()
            if out is None:
                return result
            return out.add_(result) if accumulate else out.copy_(result)
        with self._tf32(a.is_cuda and self.precision == "tf32"):
            if out is None:
                return a @ b
            return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)

    @staticmethod
    @contextlib.contextmanager
    def _tf32(enabled: bool):
        """TF32 for the GEMMs inside only; the process-wide setting is left as it was."""
        if not enabled:
            yield
            return
        matmul = torch.backends.cuda.matmul
        before, matmul.fp32_precision = matmul.fp32_precision, "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = before


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
        targets, is_text, is_marker, code_rows, roles, row_weight = layout_tensors
        w, n, code_start, num_codes, bounds, ops, single_backward, dens, gemm = meta
        text_den, marker_den, count_den, z_den = dens
        p, compute = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        weight_c = gemm.operand(weight, compute)  # fp32 (fp64), or bf16 for bf16 GEMMs
        grad_hidden = torch.empty(p, hidden.shape[1], dtype=compute, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
        code_logits = torch.empty(p, num_codes, dtype=compute, device=hidden.device)
        sums = torch.zeros(4, dtype=torch.float64, device=hidden.device)  # text, marker, count, z
        per_ce = torch.zeros(p, dtype=compute, device=hidden.device)
        ce_scale = (is_text.to(compute) * row_weight.to(compute) * (w.text / text_den)
                    + is_marker.to(compute) * (w.marker / marker_den))
        count_scale = w.count / ((n + 1) * count_den)
        for start, end in bounds:
            h = gemm.operand(hidden[start:end], compute)
            logits = gemm.mm(h, weight_c.t())  # [c, V] fp32, the only chunk-sized buffer
            y = targets[start:end]
            code_logits[start:end] = logits[:, code_start : code_start + num_codes]
            lse, target_logit, code_lse, aux = ops.stats(logits, y, code_start, num_codes)
            per_ce[start:end] = lse - target_logit
            role = roles[start:end]
            c = torch.zeros_like(lse)
            if bool((role > 0).any()):
                # Count term, per row: -log m at code rows, -log(1 - m) at the end row (m: code mass). Its
                # gradient on the logits is k * (softmax - softmax over the codes), k = 1 or -m / (1 - m).
                saturated = code_lse - lse > MAX_LOG_CODE_MASS
                log_mass = (code_lse - lse).clamp_max(MAX_LOG_CODE_MASS)
                code, end_row = role == 1, role == 2
                sums[2] += (-log_mass[code]).double().sum() + (-log1mexp(log_mass[end_row])).double().sum()
                k = torch.where(code, 1.0, 0.0).to(compute)
                k[end_row] = -torch.exp(log_mass[end_row]) / -torch.expm1(log_mass[end_row])
                c = -count_scale * torch.where(saturated, 0.0, k)
            sums[3] += lse.double().pow(2).sum()
            b_coef = ce_scale[start:end]
            a_coef = b_coef + 2.0 * w.z_loss * lse / z_den - c
            ops.grad_(logits, y, lse, code_lse, aux, a_coef, b_coef, c, code_start, num_codes)
            gemm.mm(logits, weight_c, out=grad_hidden[start:end])
            gemm.mm(logits.t(), h, out=grad_weight, accumulate=True)
            del logits
        sums[0] = (per_ce * row_weight.to(compute))[is_text].double().sum()
        sums[1] = per_ce[is_marker].double().sum()
        text, marker = sums[0] / text_den, sums[1] / marker_den
        count = sums[2] / ((n + 1) * count_den)
        z = sums[3] / z_den
        total = (w.text * text + w.marker * marker + w.count * count + w.z_loss * z).to(compute)
        ctx.save_for_backward(grad_hidden, grad_weight, code_rows, hidden[code_rows].to(compute),
                              weight[code_start : code_start + num_codes].to(compute))
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
                        row_ops: RowOps = TORCH_ROW_OPS, single_backward: bool = True,
                        matmul: str = "fp32") -> LMHeadTerms:
    bounds = chunk_bounds(layout, chunk_size)
    row_weight = text_weights_of(layout, torch.float64)
    tensors = (layout.targets, layout.is_text, layout.is_marker, layout.code_rows, count_roles(layout), row_weight)
    dens = w.denominators(layout, row_weight)
    meta = (w, layout.num_depth_tokens, code_start, num_codes, bounds, row_ops, single_backward, dens,
            LMHeadMatmul(matmul))
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


def lm_head_terms_fn(implementation: str, chunk_size: int, matmul: str = "fp32") -> Callable:
    """The back end's function; ``matmul``: the fused back ends' GEMM precision (LMHeadMatmul; the reference is
    always plain fp32)."""
    if implementation == "reference":
        return reference_lm_head_terms
    if implementation == "fused_torch":
        return lambda h, wt, layout, w, cs, k: fused_lm_head_terms(h, wt, layout, w, cs, k, chunk_size,
                                                                   matmul=matmul)
    if implementation == "fused_triton":
        return lambda h, wt, layout, w, cs, k: fused_lm_head_terms(h, wt, layout, w, cs, k, chunk_size,
                                                                   triton_row_ops(), matmul=matmul)
    raise ValueError(f"unknown LM-head implementation {implementation!r}")
