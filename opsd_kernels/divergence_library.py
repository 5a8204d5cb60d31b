"""The divergence ops registered with torch.library: what torch.compile traces and autograd
differentiates.

Two shapes of the loss, each from hidden states (`fused_linear_*`) or from logits (`divergence*`):
- `opsd::fused_linear_divergence` / `opsd::divergence`: the scalar sum_i coef_i D_i, with every
  gradient computed in the forward; the backward only multiplies them by grad_output.
- `opsd::fused_linear_divergence_rows` / `opsd::divergence_rows`: per-token D_i. Its backward
  needs d out / d D_i before a weight gradient can be formed, so it recomputes one sweep with
  coef = grad_output (one more logits GEMM; nothing [N, V] is kept between the two).
Missing optional gradients travel as empty tensors (custom ops cannot return None).

Each op's inputs are its tensors, every field of `DivergenceOptions`, then its flags; the
`*_INPUTS` objects below write the schemas and name the inputs and gradients (see
divergence_options.py), so nothing here counts positions. Both loss ops share one autograd
registration, and both per-token ops another (`_register_*_autograd`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opsd_kernels.divergence_driver import (
    fused_linear_forward_backward,
    logits_forward_backward,
    logits_grad_dtype,
)
from opsd_kernels.divergence_options import OpInputs
from opsd_kernels.types import NUM_STATS, StatColumn

_EMPTY = (0,)
_FIVE_TENSORS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_HIDDEN_STATES = {"student_hidden": "Tensor", "weight": "Tensor", "teacher_hidden": "Tensor",
                  "teacher_weight": "Tensor?", "labels": "Tensor?"}
_BIASES = {"student_bias": "Tensor?", "teacher_bias": "Tensor?"}
_LOGITS = {"student_logits": "Tensor", "teacher_logits": "Tensor", "labels": "Tensor?"}

LINEAR_LOSS_INPUTS = OpInputs({**_HIDDEN_STATES, "coef": "Tensor", **_BIASES},
                              flags=("need_grad_h", "need_grad_w", "need_grad_bs"))
LINEAR_ROWS_INPUTS = OpInputs({**_HIDDEN_STATES, **_BIASES})
LOGITS_LOSS_INPUTS = OpInputs({**_LOGITS, "coef": "Tensor"}, flags=("need_grad",))
LOGITS_ROWS_INPUTS = OpInputs(_LOGITS)
# The inputs that get gradients, each with the flag of the loss op that asks for it; the loss
# ops return their gradients in this order after (loss, stats).
_LINEAR_TRAINABLE = {"student_hidden": "need_grad_h", "weight": "need_grad_w",
                     "student_bias": "need_grad_bs"}
_LOGITS_TRAINABLE = {"student_logits": "need_grad"}


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if x is None else x


def _divergence_column(stats: Tensor) -> Tensor:
    return stats[:, StatColumn.divergence]


def _scaled(grad: Tensor, grad_output: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    if dtype is None or grad.numel() == 0:
        return None
    return (grad * grad_output.float()).to(dtype)


def _register_loss_autograd(op, spec: OpInputs, trainable: dict[str, str]) -> None:
    """The loss ops' gradients are finished in the forward: backward only scales them."""

    def setup_context(ctx, inputs, output):
        _, stats, *grads = output
        ctx.mark_non_differentiable(stats, *grads)
        ctx.save_for_backward(*grads)
        # The dtype each stored gradient is cast to, after scaling (never before: see
        # divergence_driver.py).
        a = spec.parse(inputs)
        ctx.dtypes = [None if getattr(a, name) is None else getattr(a, name).dtype
                      for name in trainable]

    def backward(ctx, grad_loss, *_unused):
        need = spec.parse(ctx.needs_input_grad)
        return spec.grads(**{
            name: _scaled(grad, grad_loss, dtype if getattr(need, name) else None)
            for name, grad, dtype in zip(trainable, ctx.saved_tensors, ctx.dtypes, strict=True)})

    op.register_autograd(backward, setup_context=setup_context)


def _register_rows_autograd(op, spec: OpInputs, loss_op, loss_spec: OpInputs,
                            trainable: dict[str, str]) -> None:
    """The per-token ops' backward is the loss op's sweep with coef = d out / d D_i."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        a = spec.parse(inputs)
        ctx.save_for_backward(*(getattr(a, name) for name in spec.tensors))
        ctx.options = spec.options(inputs)

    def backward(ctx, grad_rows, _grad_stats):
        saved = dict(zip(spec.tensors, ctx.saved_tensors, strict=True))
        need = spec.parse(ctx.needs_input_grad)
        flags = {flag: getattr(need, name) for name, flag in trainable.items()}
        _, _, *grads = loss_op(*loss_spec.pack(
            ctx.options, **saved, coef=grad_rows.float().contiguous(), **flags))
        return spec.grads(**{name: grad.to(saved[name].dtype)
                             for (name, flag), grad in zip(trainable.items(), grads, strict=True)
                             if flags[flag]})

    op.register_autograd(backward, setup_context=setup_context)


# --- from hidden states -------------------------------------------------------------------------


@torch.library.custom_op("opsd::fused_linear_divergence", mutates_args=(),
                         schema=LINEAR_LOSS_INPUTS.schema(_FIVE_TENSORS))
def fused_linear_divergence_op(*inputs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss = sum_i coef_i D_i, stats [N, NUM_STATS], grad_h, grad_w, grad_bs), grads fp32."""
    a, opts = LINEAR_LOSS_INPUTS.parse(inputs), LINEAR_LOSS_INPUTS.options(inputs)
    stats, gh, gw, gb = fused_linear_forward_backward(
        a.student_hidden, a.weight, a.teacher_hidden, a.teacher_weight, a.labels, a.coef,
        a.student_bias, a.teacher_bias, opts.row_options(), opts.top_k_support(), opts.backend,
        opts.chunk_size or None, a.need_grad_h, a.need_grad_w, a.need_grad_bs,
    )
    loss = (_divergence_column(stats) * a.coef).sum()
    return loss, stats, _or_empty(gh, a.coef), _or_empty(gw, a.coef), _or_empty(gb, a.coef)


@fused_linear_divergence_op.register_fake
def _(*inputs):
    a = LINEAR_LOSS_INPUTS.parse(inputs)
    coef, n = a.coef, a.student_hidden.shape[0]
    gh = coef.new_empty(a.student_hidden.shape if a.need_grad_h else _EMPTY)
    gw = coef.new_empty(a.weight.shape if a.need_grad_w else _EMPTY)
    gb = coef.new_empty((a.weight.shape[0],) if a.need_grad_bs and a.student_bias is not None
                        else _EMPTY)
    return coef.new_empty(()), coef.new_empty((n, NUM_STATS)), gh, gw, gb


_register_loss_autograd(fused_linear_divergence_op, LINEAR_LOSS_INPUTS, _LINEAR_TRAINABLE)


@torch.library.custom_op("opsd::fused_linear_divergence_rows", mutates_args=(),
                         schema=LINEAR_ROWS_INPUTS.schema("(Tensor, Tensor)"))
def fused_linear_divergence_rows_op(*inputs) -> tuple[Tensor, Tensor]:
    """(per-token D [N] fp32, stats [N, NUM_STATS]); no gradient work in the forward."""
    a, opts = LINEAR_ROWS_INPUTS.parse(inputs), LINEAR_ROWS_INPUTS.options(inputs)
    coef = a.student_hidden.new_zeros(a.student_hidden.shape[0], dtype=torch.float32)
    stats, *_ = fused_linear_forward_backward(
        a.student_hidden, a.weight, a.teacher_hidden, a.teacher_weight, a.labels, coef,
        a.student_bias, a.teacher_bias, opts.row_options(), opts.top_k_support(), opts.backend,
        opts.chunk_size or None, False, False, False,
    )
    return _divergence_column(stats).clone(), stats


@fused_linear_divergence_rows_op.register_fake
def _(*inputs):
    h = LINEAR_ROWS_INPUTS.parse(inputs).student_hidden
    n = h.shape[0]
    return h.new_empty((n,), dtype=torch.float32), h.new_empty((n, NUM_STATS), dtype=torch.float32)


_register_rows_autograd(fused_linear_divergence_rows_op, LINEAR_ROWS_INPUTS,
                        fused_linear_divergence_op, LINEAR_LOSS_INPUTS, _LINEAR_TRAINABLE)


# --- from logits --------------------------------------------------------------------------------


@torch.library.custom_op("opsd::divergence", mutates_args=(),
                         schema=LOGITS_LOSS_INPUTS.schema("(Tensor, Tensor, Tensor)"))
def divergence_op(*inputs) -> tuple[Tensor, Tensor, Tensor]:
    """(loss = sum_i coef_i D_i, stats [N, NUM_STATS], grad of the student logits or empty)."""
    a, opts = LOGITS_LOSS_INPUTS.parse(inputs), LOGITS_LOSS_INPUTS.options(inputs)
    stats, grad = logits_forward_backward(
        a.student_logits, a.teacher_logits, a.labels, a.coef, opts.row_options(),
        opts.top_k_support(), opts.backend, opts.chunk_size or None, a.need_grad)
    loss = (_divergence_column(stats) * a.coef).sum()
    if grad is None:
        grad = a.student_logits.new_empty(_EMPTY,
                                          dtype=logits_grad_dtype(a.student_logits.dtype))
    return loss, stats, grad


@divergence_op.register_fake
def _(*inputs):
    a = LOGITS_LOSS_INPUTS.parse(inputs)
    s, coef = a.student_logits, a.coef
    grad = s.new_empty(s.shape if a.need_grad else _EMPTY, dtype=logits_grad_dtype(s.dtype))
    return coef.new_empty(()), coef.new_empty((s.shape[0], NUM_STATS)), grad


_register_loss_autograd(divergence_op, LOGITS_LOSS_INPUTS, _LOGITS_TRAINABLE)


@torch.library.custom_op("opsd::divergence_rows", mutates_args=(),
                         schema=LOGITS_ROWS_INPUTS.schema("(Tensor, Tensor)"))
def divergence_rows_op(*inputs) -> tuple[Tensor, Tensor]:
    """(per-token D [N] fp32, stats [N, NUM_STATS]) from logits."""
    a, opts = LOGITS_ROWS_INPUTS.parse(inputs), LOGITS_ROWS_INPUTS.options(inputs)
    coef = a.student_logits.new_zeros(a.student_logits.shape[0], dtype=torch.float32)
    stats, _ = logits_forward_backward(
        a.student_logits, a.teacher_logits, a.labels, coef, opts.row_options(),
        opts.top_k_support(), opts.backend, opts.chunk_size or None, False)
    return _divergence_column(stats).clone(), stats


@divergence_rows_op.register_fake
def _(*inputs):
    s = LOGITS_ROWS_INPUTS.parse(inputs).student_logits
    n = s.shape[0]
    return s.new_empty((n,), dtype=torch.float32), s.new_empty((n, NUM_STATS), dtype=torch.float32)


_register_rows_autograd(divergence_rows_op, LOGITS_ROWS_INPUTS, divergence_op,
                        LOGITS_LOSS_INPUTS, _LOGITS_TRAINABLE)
