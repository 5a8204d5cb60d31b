"""Public losses: per-token KL / generalized JSD between a student and a teacher head.

The math and its conventions (TRL's `generalized_jsd_loss`, the OPSD reference code) are in
`opsd_kernels.reference.divergence`; the kernels in `opsd_kernels.ops`.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from torch import nn

from opsd_kernels import _guards
from opsd_kernels import _validate as v
from opsd_kernels._backend import resolve_backend
from opsd_kernels.divergence_library import (
    LINEAR_LOSS_INPUTS,
    LINEAR_ROWS_INPUTS,
    LOGITS_LOSS_INPUTS,
    LOGITS_ROWS_INPUTS,
    divergence_op,
    divergence_rows_op,
    fused_linear_divergence_op,
    fused_linear_divergence_rows_op,
)
from opsd_kernels.divergence_options import DivergenceOptions
from opsd_kernels.types import (
    Backend,
    DivergenceKind,
    DivergenceStats,
    Reduction,
    StatColumn,
    TopKSource,
)


class _Tokens(NamedTuple):
    shape: torch.Size
    labels: torch.Tensor | None
    weights: torch.Tensor | None
    valid: torch.Tensor


def _tokens(token_shape, device, vocab, labels, ignore_index, token_weights) -> _Tokens:
    n = token_shape.numel()
    if labels is not None:
        v.check_labels(labels, token_shape, vocab, ignore_index)
        labels = labels.reshape(n).to(device=device, dtype=torch.int64).contiguous()
        valid = labels != ignore_index
    else:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    if token_weights is not None:
        v.check_token_weights(token_weights, token_shape)
        token_weights = token_weights.reshape(n).float().contiguous()
    return _Tokens(token_shape, labels, token_weights, valid)


def _row_coef(tok: _Tokens, reduction: str, num_items) -> torch.Tensor:
    """d loss / d D_i for the scalar reductions (0 on masked tokens)."""
    coef = tok.valid.float()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(coef.device)
    if tok.weights is not None:
        coef = coef * tok.weights
    if reduction == "sum":
        return coef
    if reduction == "mean":
        denom = tok.valid.sum().clamp_min(1) if num_items is None else num_items
        return coef / denom
    # sequence_mean: mean over each sequence's unmasked tokens, then over non-empty sequences.
    counts = tok.valid.reshape(tok.shape).sum(-1, keepdim=True)
    coef = (coef.reshape(tok.shape) / counts.clamp_min(1)).reshape(-1)
    denom = (counts > 0).sum().clamp_min(1) if num_items is None else num_items
    return coef / denom


def _check_reduction(reduction: str, token_shape: torch.Size, num_items) -> None:
    v.check(reduction != "sequence_mean" or len(token_shape) == 2,
            "reduction: 'sequence_mean' needs [B, T, ...] inputs to know the sequences")
    if num_items is None:
        return
    v.check(reduction in ("mean", "sequence_mean"), f"num_items: only meaningful with "
            f"reduction 'mean' or 'sequence_mean', not {reduction!r}")
    if not isinstance(num_items, torch.Tensor):
        v.check(isinstance(num_items, (int, float)) and math.isfinite(num_items)
                and num_items > 0, f"num_items: must be a finite number > 0, got {num_items!r}")
    else:
        v.check(num_items.numel() == 1, f"num_items: expected one element, got shape "
                f"{tuple(num_items.shape)}")


def _as_stats(stats: torch.Tensor, token_shape: torch.Size) -> DivergenceStats:
    return DivergenceStats._make(stats[:, column].reshape(token_shape) for column in StatColumn)


def _empty_batch(token_shape: torch.Size, reduction: str, return_stats: bool,
                 *inputs: torch.Tensor | None):
    """No tokens: a zero loss on the graph (zero gradients of the inputs' shapes), empty stats."""
    loss = _guards.empty_batch_loss(token_shape, reduction, *inputs)
    if not return_stats:
        return loss
    return loss, _as_stats(loss.new_zeros(0, len(DivergenceStats._fields)), token_shape)


def _needs_grad(x: torch.Tensor | None) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


def _option_args(divergence, beta, temperature, teacher_temperature, top_k, top_k_source,
                 tail_bucket, clip, logit_softcap, ignore_index, backend,
                 chunk_size) -> DivergenceOptions:
    """The scalar options of the registered ops, as their schemas type them."""
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    return DivergenceOptions(
        kind=divergence, beta=float(beta), temperature=float(temperature),
        teacher_temperature=float(tau_t), top_k=top_k or 0, top_k_source=top_k_source,
        tail_bucket=bool(tail_bucket), clip=None if clip is None else float(clip),
        softcap=None if logit_softcap is None else float(logit_softcap),
        ignore_index=int(ignore_index), backend=backend, chunk_size=chunk_size or 0)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    divergence: DivergenceKind = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    top_k: int | None = None,
    top_k_source: TopKSource = "teacher",
    tail_bucket: bool = False,
    clip: float | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    num_items: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    backend: Backend = "auto",
    return_stats: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DivergenceStats]:
    """Per-token divergence between student and teacher heads, without [tokens x vocab] logits.

    The student's logits are ``student_hidden @ weight.T (+ student_bias)``, the teacher's
    ``teacher_hidden @ teacher_weight.T (+ teacher_bias)``; both are formed a chunk of rows at a
    time in fp32 and never kept. Gradients (student hidden, weight and student bias, when they
    require grad) are computed during the forward; the teacher gets none.

    Args:
        student_hidden: [N, H] or [B, T, H], the student's final hidden states.
        weight: [V, H] the student's lm_head (frozen or trainable).
        teacher_hidden: [N, H'] or [B, T, H'], the teacher's hidden states at the same tokens;
            must not require grad (the teacher is a fixed target).
        teacher_weight: [V, H'] the teacher's head; None shares ``weight`` (self-distillation),
            and both roles' logits then come from one GEMM.
        labels: [N] or [B, T] sampled token ids; tokens equal to ``ignore_index`` carry no loss.
        divergence: "jsd" (generalized JSD), "forward_kl" KL(q || p), "reverse_kl" KL(p || q),
            or "sampled" (-a log p(y), a = log q(y) - log p(y) detached; needs labels).
        beta: generalized JSD weight, TRL's convention: 0 = forward KL, 1 = reverse KL,
            m = beta q + (1 - beta) p.
        temperature: divides both roles' logits inside the softmax (no tau^2 factor);
            ``teacher_temperature`` overrides it for the teacher.
        top_k: compare only on the top-k tokens of ``top_k_source`` ("teacher" or "student"):
            both distributions renormalised on it, or, with ``tail_bucket``, true probabilities
            plus one bucket holding the remaining mass.
        clip: cap each (token, vocab) term of the divergence at ``clip`` before the vocab sum
            (OPSD's point-wise clipping), with the exact gradient. The loss may go negative.
        token_weights: [N] or [B, T] constant per-token weights, applied before the reduction.
        reduction: "mean" (sum of weighted losses / number of unmasked tokens), "sum", "none"
            (per-token weighted losses shaped like the tokens), or "sequence_mean" (mean over
            each sequence's unmasked tokens, then over sequences with any; needs [B, T] input).
        num_items: replaces the denominator of "mean" / "sequence_mean" (global token or
            sequence count for gradient accumulation and data parallelism).
        logit_softcap: logits become ``cap * tanh(z / cap)`` before the temperature (Gemma 2).
        backend: "auto" (Triton on CUDA; on CPU the native kernels when built, else
            PyTorch), "triton", "native" or "torch"; the environment variable OPSD_BACKEND
            overrides "auto".
        return_stats: also return a :class:`DivergenceStats` of per-token by-products.
        chunk_size: rows per chunk; by default as many as fit the workspace (512 MiB on a
            GPU, 64 MiB on a CPU), whatever N is.

    Returns:
        The loss (fp32; a scalar, or token-shaped for reduction "none"), and the stats if asked.
        With no tokens (B = 0 or T = 0) the loss is 0 and every input that requires grad gets a
        zero gradient. With OPSD_CHECK_FINITE=1 in the environment, NaN or Inf in an input or
        the loss raises a ValueError naming the tensor.
    """
    v.check_float_tensor("student_hidden", student_hidden, (2, 3))
    _guards.check_teacher_weight_slot(teacher_weight, student_hidden.shape[:-1])
    v.check_float_tensor("teacher_hidden", teacher_hidden, (2, 3))
    v.check_float_tensor("weight", weight, (2,))
    token_shape = student_hidden.shape[:-1]
    hidden = student_hidden.shape[-1]
    v.check(teacher_hidden.shape[:-1] == token_shape, f"teacher_hidden: token dims "
            f"{tuple(teacher_hidden.shape[:-1])} differ from student_hidden's {tuple(token_shape)}")
    v.check(weight.shape[1] == hidden, f"weight: shape {tuple(weight.shape)} does not match "
            f"student_hidden's hidden size {hidden}")
    v.check(student_hidden.dtype == weight.dtype, f"student_hidden: dtype {student_hidden.dtype} "
            f"differs from weight's {weight.dtype}")
    v.check(not teacher_hidden.requires_grad, "teacher_hidden: requires grad, but the teacher is "
            "a fixed target; compute it under torch.no_grad() or .detach() it")
    vocab = weight.shape[0]
    teacher_head = weight if teacher_weight is None else teacher_weight
    if teacher_weight is not None:
        v.check_float_tensor("teacher_weight", teacher_weight, (2,))
        v.check(teacher_weight.shape[0] == vocab, f"teacher_weight: vocab size "
                f"{teacher_weight.shape[0]} differs from weight's {vocab}")
    v.check(teacher_head.shape[1] == teacher_hidden.shape[-1], f"teacher_hidden: hidden size "
            f"{teacher_hidden.shape[-1]} does not match the teacher head "
            f"{tuple(teacher_head.shape)}")
    v.check(teacher_hidden.dtype == teacher_head.dtype, f"teacher_hidden: dtype "
            f"{teacher_hidden.dtype} differs from its head's {teacher_head.dtype}")
    if student_bias is not None:
        v.check_bias("student_bias", student_bias, vocab, weight.dtype)
    if teacher_bias is not None:
        v.check_bias("teacher_bias", teacher_bias, vocab, teacher_head.dtype)
    v.check_same_device(student_hidden=student_hidden, weight=weight,
                        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                        labels=labels, token_weights=token_weights, student_bias=student_bias,
                        teacher_bias=teacher_bias)
    v.check_options(divergence=divergence, beta=beta, temperature=temperature,
                    teacher_temperature=teacher_temperature, top_k=top_k,
                    top_k_source=top_k_source, tail_bucket=tail_bucket, clip=clip,
                    logit_softcap=logit_softcap, reduction=reduction, vocab=vocab,
                    has_labels=labels is not None, chunk_size=chunk_size)
    _check_reduction(reduction, token_shape, num_items)
    tok = _tokens(token_shape, student_hidden.device, vocab, labels, ignore_index, token_weights)
    options = _option_args(divergence, beta, temperature, teacher_temperature, top_k,
                           top_k_source, tail_bucket, clip, logit_softcap, ignore_index,
                           resolve_backend(backend, student_hidden.device), chunk_size)
    if token_shape.numel() == 0:
        return _empty_batch(token_shape, reduction, return_stats, student_hidden, weight,
                            student_bias)
    check_finite = _guards.finite_check_enabled()
    if check_finite:
        _guards.check_finite(student_hidden=student_hidden, weight=weight,
                             teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                             student_bias=student_bias, teacher_bias=teacher_bias,
                             token_weights=token_weights)

    n = token_shape.numel()
    h_s = student_hidden.reshape(n, hidden).contiguous()
    h_t = teacher_hidden.reshape(n, teacher_hidden.shape[-1]).contiguous()
    w_t = None if teacher_weight is None else teacher_weight.contiguous()
    tensors = dict(student_hidden=h_s, weight=weight.contiguous(), teacher_hidden=h_t,
                   teacher_weight=w_t, labels=tok.labels, student_bias=student_bias,
                   teacher_bias=teacher_bias)
    if reduction == "none":
        per_token, stats = fused_linear_divergence_rows_op(
            *LINEAR_ROWS_INPUTS.pack(options, **tensors))
        loss = per_token if tok.weights is None else per_token * tok.weights
        loss = loss.reshape(token_shape)
    else:
        loss, stats, *_ = fused_linear_divergence_op(*LINEAR_LOSS_INPUTS.pack(
            options, **tensors, coef=_row_coef(tok, reduction, num_items),
            need_grad_h=_needs_grad(student_hidden), need_grad_w=_needs_grad(weight),
            need_grad_bs=_needs_grad(student_bias)))
    if check_finite:
        _guards.check_finite(loss=loss)
    return (loss, _as_stats(stats, token_shape)) if return_stats else loss


@torch.no_grad()
def divergence_stats(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    **options,
) -> DivergenceStats:
    """Per-token divergence, entropies, log-sum-exps and label log-probs, without gradients.

    Takes the arguments of :func:`fused_linear_divergence` (reduction, token weights and
    num_items do not apply). Use it to compute token weights from statistics of the same
    distributions (entropy-guided, position-weighted, rewards with a full-KL baseline) before
    the training pass. Never materialises [tokens x vocab] logits.
    """
    for name in ("reduction", "token_weights", "num_items", "return_stats"):
        v.check(name not in options, f"{name}: not an option of divergence_stats")
    _, stats = fused_linear_divergence(student_hidden, weight, teacher_hidden, teacher_weight,
                                       reduction="sum", return_stats=True, **options)
    return stats


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    divergence: DivergenceKind = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    top_k: int | None = None,
    top_k_source: TopKSource = "teacher",
    tail_bucket: bool = False,
    clip: float | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    num_items: float | torch.Tensor | None = None,
    logit_softcap: float | None = None,
    backend: Backend = "auto",
    return_stats: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DivergenceStats]:
    """The loss of :func:`fused_linear_divergence` on logits the caller already has.

    Args:
        student_logits: [N, V] or [B, T, V] (requires grad for training).
        teacher_logits: same shape, no grad.
        Every other argument as in :func:`fused_linear_divergence`.

    Returns:
        The loss (and the stats). The only [N, V] buffer it allocates is the gradient; fp32
        work happens one chunk of rows at a time. Empty batches and OPSD_CHECK_FINITE as in
        :func:`fused_linear_divergence`.
    """
    v.check_float_tensor("student_logits", student_logits, (2, 3))
    v.check_float_tensor("teacher_logits", teacher_logits, (2, 3))
    v.check(teacher_logits.shape == student_logits.shape, f"teacher_logits: shape "
            f"{tuple(teacher_logits.shape)} differs from student_logits' "
            f"{tuple(student_logits.shape)}")
    v.check(not teacher_logits.requires_grad, "teacher_logits: requires grad, but the teacher "
            "is a fixed target; compute it under torch.no_grad() or .detach() it")
    v.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                        labels=labels, token_weights=token_weights)
    token_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    v.check_options(divergence=divergence, beta=beta, temperature=temperature,
                    teacher_temperature=teacher_temperature, top_k=top_k,
                    top_k_source=top_k_source, tail_bucket=tail_bucket, clip=clip,
                    logit_softcap=logit_softcap, reduction=reduction, vocab=vocab,
                    has_labels=labels is not None, chunk_size=chunk_size)
    _check_reduction(reduction, token_shape, num_items)
    tok = _tokens(token_shape, student_logits.device, vocab, labels, ignore_index, token_weights)
    options = _option_args(divergence, beta, temperature, teacher_temperature, top_k,
                           top_k_source, tail_bucket, clip, logit_softcap, ignore_index,
                           resolve_backend(backend, student_logits.device), chunk_size)
    if token_shape.numel() == 0:
        return _empty_batch(token_shape, reduction, return_stats, student_logits)
    check_finite = _guards.finite_check_enabled()
    if check_finite:
        _guards.check_finite(student_logits=student_logits, teacher_logits=teacher_logits,
                             token_weights=token_weights)
    n = token_shape.numel()
    s = student_logits.reshape(n, vocab).contiguous()
    t = teacher_logits.reshape(n, vocab).contiguous()
    tensors = dict(student_logits=s, teacher_logits=t, labels=tok.labels)
    if reduction == "none":
        per_token, stats = divergence_rows_op(*LOGITS_ROWS_INPUTS.pack(options, **tensors))
        loss = per_token if tok.weights is None else per_token * tok.weights
        loss = loss.reshape(token_shape)
    else:
        loss, stats, _ = divergence_op(*LOGITS_LOSS_INPUTS.pack(
            options, **tensors, coef=_row_coef(tok, reduction, num_items),
            need_grad=_needs_grad(student_logits)))
    if check_finite:
        _guards.check_finite(loss=loss)
    return (loss, _as_stats(stats, token_shape)) if return_stats else loss


def _keyword_options(fn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


class FusedLinearDivergenceLoss(nn.Module):
    """:func:`fused_linear_divergence` as a module holding its options.

    ``FusedLinearDivergenceLoss(divergence="jsd", beta=0.5, temperature=1.1)(student_hidden,
    lm_head.weight, teacher_hidden, labels=labels)``; per-call tensors (labels, token_weights,
    num_items, biases, teacher_weight) go to forward, every other option to the constructor.
    """

    _PER_CALL = ("labels", "token_weights", "num_items", "student_bias", "teacher_bias")

    def __init__(self, **options) -> None:
        super().__init__()
        known = _keyword_options(fused_linear_divergence)
        for name in options:
            v.check(name not in self._PER_CALL, f"{name}: pass it to forward, not to the "
                    "constructor")
            v.check(name in known, f"{name}: not an option of fused_linear_divergence")
        self.options = options

    def forward(
        self,
        student_hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor | None = None,
        **per_call,
    ) -> torch.Tensor | tuple[torch.Tensor, DivergenceStats]:
        for name in per_call:
            v.check(name in self._PER_CALL, f"{name}: not a per-call argument (expected one of "
                    f"{self._PER_CALL})")
        return fused_linear_divergence(student_hidden, weight, teacher_hidden, teacher_weight,
                                       **self.options, **per_call)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={val!r}" for k, val in self.options.items())
