"""What the public losses settle before any kernel runs: empty batches, tensors passed in the
wrong positional slot, and (opt-in) non-finite inputs."""

from __future__ import annotations

import os
from typing import Any

import torch

CHECK_FINITE_ENV = "OPSD_CHECK_FINITE"


class _ZerosOnGraph(torch.autograd.Function):
    """Zeros whose gradient is zero for every input: what a batch without tokens contributes.
    A trainer's next line (clipping, ``isfinite(grad)``, DDP's reducer) expects a ``.grad`` of
    the right shape on every input that requires grad, as PyTorch's own losses give."""

    @staticmethod
    def forward(ctx: Any, shape: torch.Size, device: torch.device,
                *inputs: torch.Tensor) -> torch.Tensor:
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs]
        return torch.zeros(shape, dtype=torch.float32, device=device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[2:]
        return (None, None, *(torch.zeros(s, dtype=d, device=dev) if need else None
                              for need, (s, d, dev) in zip(needs, ctx.like, strict=True)))


def zeros_on_graph(shape: tuple[int, ...], device: torch.device,
                   *inputs: torch.Tensor | None) -> torch.Tensor:
    """fp32 zeros of ``shape`` that backpropagate zero gradients to every input."""
    return _ZerosOnGraph.apply(torch.Size(shape), device, *(x for x in inputs if x is not None))


def empty_batch_loss(token_shape: torch.Size, reduction: str,
                     *inputs: torch.Tensor | None) -> torch.Tensor:
    """The loss (0, or empty token-shaped for reduction "none") of a batch with no tokens, tied
    to every input so each gets a zero gradient."""
    shape = token_shape if reduction == "none" else ()
    return zeros_on_graph(shape, inputs[0].device, *inputs)


def check_teacher_weight_slot(teacher_weight: Any, token_shape: torch.Size) -> None:
    """The fourth positional argument is the teacher's head; labels or token weights land there
    when passed by position (every argument after it is keyword-only)."""
    if teacher_weight is None:
        return
    if isinstance(teacher_weight, torch.Tensor) and (
            teacher_weight.is_floating_point() and teacher_weight.dim() == 2
            and teacher_weight.shape != token_shape):
        return
    got = (f"a {teacher_weight.dtype} tensor of shape {tuple(teacher_weight.shape)}"
           if isinstance(teacher_weight, torch.Tensor) else type(teacher_weight).__name__)
    raise ValueError(f"teacher_weight: got {got}, not a [V, H] head weight; the fourth "
                     "positional argument is the teacher's lm_head weight, and labels, "
                     "token_weights and every option are keyword-only (labels=..., ...)")


def finite_check_enabled() -> bool:
    """OPSD_CHECK_FINITE=1: the losses check their inputs and result for NaN / Inf (one host
    sync per tensor, so off by default; PyTorch's semantics otherwise: NaN in, NaN out)."""
    return os.environ.get(CHECK_FINITE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raise naming the first floating-point tensor holding NaN or Inf."""
    for name, x in tensors.items():
        if x is None or not x.is_floating_point():
            continue
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError(f"{name}: contains NaN or Inf ({CHECK_FINITE_ENV} is set; unset it "
                             "to let non-finite values through as PyTorch does)")
