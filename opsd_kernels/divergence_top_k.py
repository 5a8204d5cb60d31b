"""Top-k supports for any row step: the row step only ever sees full rows, so the kept logits
are gathered into rows of their own (plus a tail bucket when asked), the same step runs on them,
and the gradient is scattered back to the full vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from opsd_kernels.divergence_options import RowOptions, TopK
from opsd_kernels.types import StatColumn

# step(s, t, labels, coef, stats, opts: RowOptions, write_grad: bool) -> None: the contract of
# ops/divergence_torch.py, ops/divergence.py and ops/divergence_native.py.
RowStep = Callable[..., None]


def with_top_k(step: RowStep, top_k: TopK | None) -> RowStep:
    """`step` itself on full rows, else `step` on the top-k support of each row."""
    return step if top_k is None else functools.partial(top_k_row_step, step, top_k=top_k)


def _scale(z: torch.Tensor, inv_tau: float, softcap: float | None) -> torch.Tensor:
    return (z if softcap is None else softcap * torch.tanh(z / softcap)) * inv_tau


def top_k_row_step(step: RowStep, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                   coef: torch.Tensor, stats: torch.Tensor, opts: RowOptions, write_grad: bool,
                   top_k: TopK) -> None:
    """The row step's contract on the top-k support of each row (with a tail bucket if asked)."""
    s_sc = _scale(s, opts.inv_tau_s, opts.softcap)
    t_sc = _scale(t, opts.inv_tau_t, opts.softcap)
    idx = (t_sc if top_k.source == "teacher" else s_sc).topk(top_k.k, dim=-1).indices
    s_k, t_k = s_sc.gather(-1, idx), t_sc.gather(-1, idx)
    if top_k.tail_bucket:
        # The tail "logit" is the log-sum-exp outside the support: softmax over [kept, tail]
        # gives each kept token its true probability and the tail the remaining mass.
        s_out = s_sc.scatter(-1, idx, float("-inf"))
        s_tail = s_out.logsumexp(-1, keepdim=True)
        t_tail = t_sc.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
        s_k, t_k = torch.cat([s_k, s_tail], -1), torch.cat([t_k, t_tail], -1)

    # The row step sees pre-scaled logits and only the mask of the labels.
    mask_labels = None
    if labels is not None:
        mask_labels = torch.where(labels == opts.ignore_index, labels, torch.zeros_like(labels))
    step(s_k, t_k, mask_labels, coef, stats, opts.unscaled(), write_grad)

    # The full-vocabulary stats replace what the step wrote from the support alone.
    lse_s, lse_t = s_sc.logsumexp(-1), t_sc.logsumexp(-1)
    full = {StatColumn.student_lse: lse_s, StatColumn.teacher_lse: lse_t,
            StatColumn.student_logprob: torch.zeros_like(lse_s),
            StatColumn.teacher_logprob: torch.zeros_like(lse_t)}
    if labels is not None:
        valid = labels != opts.ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        full[StatColumn.student_logprob] = s_sc.gather(-1, safe).squeeze(-1) - lse_s
        full[StatColumn.teacher_logprob] = t_sc.gather(-1, safe).squeeze(-1) - lse_t
        full = {c: torch.where(valid, x, torch.zeros_like(x)) for c, x in full.items()}
    for column, values in full.items():
        stats[:, column] = values
    if not write_grad:
        return

    grad = torch.zeros_like(s_sc).scatter_(-1, idx, s_k[:, : top_k.k])
    if top_k.tail_bucket:
        # d tail / d s_v = softmax of the outside logits: 0 on the support (s_out is -inf there),
        # and 0 everywhere when nothing outside has mass (s_tail = -inf: top_k = V, or -inf
        # padding), where exp(-inf + inf) would be NaN.
        tail_share = (s_out - s_tail).exp_().nan_to_num_(nan=0.0)
        grad.add_(tail_share.mul_(s_k[:, top_k.k :]))
    if opts.softcap is None:
        grad.mul_(opts.inv_tau_s)
    else:
        th = torch.tanh(s / opts.softcap)
        grad.mul_((1 - th * th) * opts.inv_tau_s)
    s.copy_(grad)
