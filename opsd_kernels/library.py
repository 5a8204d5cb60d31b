"""The registered ops (torch.library): what torch.compile traces and autograd differentiates.

Two shapes of the loss, each from hidden states (`fused_linear_*`) or from logits (`divergence*`):
- `opsd::fused_linear_divergence` / `opsd::divergence`: the scalar sum_i coef_i D_i, with every
  gradient computed in the forward; the backward only multiplies them by grad_output.
- `opsd::fused_linear_divergence_rows` / `opsd::divergence_rows`: per-token D_i. Its backward
  needs d out / d D_i before a weight gradient can be formed, so it recomputes one sweep with
  coef = grad_output (one more logits GEMM; nothing [N, V] is kept between the two).
Missing optional gradients travel as empty tensors (custom ops cannot return None).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from opsd_kernels.chunked import TopK
from opsd_kernels.linear import (
    fused_linear_forward_backward,
    logits_forward_backward,
    logits_grad_dtype,
)
from opsd_kernels.row_options import RowOptions
from opsd_kernels.types import NUM_STATS

_EMPTY = (0,)


def _options(kind, beta, temperature, teacher_temperature, top_k, top_k_source, tail_bucket,
             clip, softcap, ignore_index) -> tuple[RowOptions, TopK | None]:
    opts = RowOptions.make(kind, beta, temperature, teacher_temperature, clip, softcap,
                           ignore_index)
    return opts, (TopK(top_k, top_k_source, tail_bucket) if top_k > 0 else None)


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if x is None else x


# --- from hidden states -------------------------------------------------------------------------


@torch.library.custom_op("opsd::fused_linear_divergence", mutates_args=())
def fused_linear_divergence_op(
    student_hidden: Tensor, weight: Tensor, teacher_hidden: Tensor,
    teacher_weight: Optional[Tensor], labels: Optional[Tensor], coef: Tensor,
    student_bias: Optional[Tensor], teacher_bias: Optional[Tensor],
    kind: str, beta: float, temperature: float, teacher_temperature: float, top_k: int,
    top_k_source: str, tail_bucket: bool, clip: Optional[float], softcap: Optional[float],
    ignore_index: int, backend: str, chunk_size: int,
    need_grad_h: bool, need_grad_w: bool, need_grad_bs: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss = sum_i coef_i D_i, stats [N, NUM_STATS], grad_h, grad_w, grad_bs), grads fp32."""
    opts, top = _options(kind, beta, temperature, teacher_temperature, top_k, top_k_source,
                         tail_bucket, clip, softcap, ignore_index)
    stats, gh, gw, gb = fused_linear_forward_backward(
        student_hidden, weight, teacher_hidden, teacher_weight, labels, coef, student_bias,
        teacher_bias, opts, top, backend, chunk_size or None, need_grad_h, need_grad_w,
        need_grad_bs,
    )
    loss = (stats[:, 0] * coef).sum()
    return loss, stats, _or_empty(gh, coef), _or_empty(gw, coef), _or_empty(gb, coef)


@fused_linear_divergence_op.register_fake
def _(student_hidden, weight, teacher_hidden, teacher_weight, labels, coef, student_bias,
      teacher_bias, *args):
    need_grad_h, need_grad_w, need_grad_bs = args[-3:]
    n = student_hidden.shape[0]
    loss = coef.new_empty(())
    stats = coef.new_empty((n, NUM_STATS))
    gh = coef.new_empty(student_hidden.shape if need_grad_h else _EMPTY)
    gw = coef.new_empty(weight.shape if need_grad_w else _EMPTY)
    gb = coef.new_empty((weight.shape[0],) if need_grad_bs and student_bias is not None
                        else _EMPTY)
    return loss, stats, gh, gw, gb


def _setup_scalar_loss(ctx, inputs, output):
    _, stats, *grads = output
    ctx.mark_non_differentiable(stats, *grads)
    ctx.save_for_backward(*grads)
    # The dtype each stored gradient is cast to, after scaling (never before: see linear.py).
    ctx.grad_dtypes = [x.dtype if isinstance(x, Tensor) else None for x in inputs[:7]]


def _scaled(grad: Tensor, grad_output: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    if dtype is None or grad.numel() == 0:
        return None
    return (grad * grad_output.float()).to(dtype)


def _backward_linear_loss(ctx, grad_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    need, dtypes = ctx.needs_input_grad, ctx.grad_dtypes
    return (_scaled(gh, grad_loss, dtypes[0] if need[0] else None),
            _scaled(gw, grad_loss, dtypes[1] if need[1] else None), None, None, None, None,
            _scaled(gb, grad_loss, dtypes[6] if need[6] else None)) + (None,) * 16


fused_linear_divergence_op.register_autograd(
    _backward_linear_loss, setup_context=_setup_scalar_loss
)


@torch.library.custom_op("opsd::fused_linear_divergence_rows", mutates_args=())
def fused_linear_divergence_rows_op(
    student_hidden: Tensor, weight: Tensor, teacher_hidden: Tensor,
    teacher_weight: Optional[Tensor], labels: Optional[Tensor],
    student_bias: Optional[Tensor], teacher_bias: Optional[Tensor],
    kind: str, beta: float, temperature: float, teacher_temperature: float, top_k: int,
    top_k_source: str, tail_bucket: bool, clip: Optional[float], softcap: Optional[float],
    ignore_index: int, backend: str, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """(per-token D [N] fp32, stats [N, NUM_STATS]); no gradient work in the forward."""
    opts, top = _options(kind, beta, temperature, teacher_temperature, top_k, top_k_source,
                         tail_bucket, clip, softcap, ignore_index)
    coef = student_hidden.new_zeros(student_hidden.shape[0], dtype=torch.float32)
    stats, *_ = fused_linear_forward_backward(
        student_hidden, weight, teacher_hidden, teacher_weight, labels, coef, student_bias,
        teacher_bias, opts, top, backend, chunk_size or None, False, False, False,
    )
    return stats[:, 0].clone(), stats


@fused_linear_divergence_rows_op.register_fake
def _(student_hidden, *args):
    n = student_hidden.shape[0]
    per_token = student_hidden.new_empty((n,), dtype=torch.float32)
    return per_token, student_hidden.new_empty((n, NUM_STATS), dtype=torch.float32)


def _setup_rows(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*[x if isinstance(x, Tensor) else None for x in inputs[:7]])
    ctx.options = inputs[7:]


def _backward_linear_rows(ctx, grad_rows, _grad_stats):
    h_s, w, h_t, w_t, labels, b_s, b_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    _, _, gh, gw, gb = fused_linear_divergence_op(
        h_s, w, h_t, w_t, labels, grad_rows.float().contiguous(), b_s, b_t, *ctx.options,
        need[0], need[1], need[5],
    )
    return (gh.to(h_s.dtype) if need[0] else None, gw.to(w.dtype) if need[1] else None, None,
            None, None, gb.to(b_s.dtype) if need[5] else None) + (None,) * 13


fused_linear_divergence_rows_op.register_autograd(_backward_linear_rows, setup_context=_setup_rows)


# --- from logits --------------------------------------------------------------------------------


@torch.library.custom_op("opsd::divergence", mutates_args=())
def divergence_op(
    student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor], coef: Tensor,
    kind: str, beta: float, temperature: float, teacher_temperature: float, top_k: int,
    top_k_source: str, tail_bucket: bool, clip: Optional[float], softcap: Optional[float],
    ignore_index: int, backend: str, chunk_size: int, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss = sum_i coef_i D_i, stats [N, NUM_STATS], grad of the student logits or empty)."""
    opts, top = _options(kind, beta, temperature, teacher_temperature, top_k, top_k_source,
                         tail_bucket, clip, softcap, ignore_index)
    stats, grad = logits_forward_backward(student_logits, teacher_logits, labels, coef, opts,
                                          top, backend, chunk_size or None, need_grad)
    loss = (stats[:, 0] * coef).sum()
    if grad is None:
        grad = student_logits.new_empty(_EMPTY, dtype=logits_grad_dtype(student_logits.dtype))
    return loss, stats, grad


@divergence_op.register_fake
def _(student_logits, teacher_logits, labels, coef, *args):
    need_grad = args[-1]
    grad_dtype = logits_grad_dtype(student_logits.dtype)
    grad = student_logits.new_empty(student_logits.shape if need_grad else _EMPTY,
                                    dtype=grad_dtype)
    return coef.new_empty(()), coef.new_empty((student_logits.shape[0], NUM_STATS)), grad


def _backward_logits_loss(ctx, grad_loss, *_unused):
    (grad,) = ctx.saved_tensors
    dtype = ctx.grad_dtypes[0] if ctx.needs_input_grad[0] else None
    return (_scaled(grad, grad_loss, dtype),) + (None,) * 16


divergence_op.register_autograd(_backward_logits_loss, setup_context=_setup_scalar_loss)


@torch.library.custom_op("opsd::divergence_rows", mutates_args=())
def divergence_rows_op(
    student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
    kind: str, beta: float, temperature: float, teacher_temperature: float, top_k: int,
    top_k_source: str, tail_bucket: bool, clip: Optional[float], softcap: Optional[float],
    ignore_index: int, backend: str, chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """(per-token D [N] fp32, stats [N, NUM_STATS]) from logits."""
    opts, top = _options(kind, beta, temperature, teacher_temperature, top_k, top_k_source,
                         tail_bucket, clip, softcap, ignore_index)
    coef = student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
    stats, _ = logits_forward_backward(student_logits, teacher_logits, labels, coef, opts, top,
                                       backend, chunk_size or None, False)
    return stats[:, 0].clone(), stats


@divergence_rows_op.register_fake
def _(student_logits, *args):
    n = student_logits.shape[0]
    per_token = student_logits.new_empty((n,), dtype=torch.float32)
    return per_token, student_logits.new_empty((n, NUM_STATS), dtype=torch.float32)


def _setup_logits_rows(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:3])
    ctx.options = inputs[3:]


def _backward_logits_rows(ctx, grad_rows, _grad_stats):
    if not ctx.needs_input_grad[0]:
        return (None,) * 15
    s, t, labels = ctx.saved_tensors
    _, _, grad = divergence_op(s, t, labels, grad_rows.float().contiguous(), *ctx.options, True)
    return (grad.to(s.dtype),) + (None,) * 14


divergence_rows_op.register_autograd(_backward_logits_rows, setup_context=_setup_logits_rows)
