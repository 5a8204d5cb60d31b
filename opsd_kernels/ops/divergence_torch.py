"""The per-row divergence step in plain PyTorch: the CPU fallback of the Triton kernel.

Same contract as the Triton launcher `divergence_rows_triton_`: given raw logits of both roles
for a block of rows, write per-row statistics and (optionally) d loss / d student logits over
the student logits (which are clobbered either way). The gradient is analytic (derivation in
`ops/divergence.py`); autograd is not used. Eager PyTorch pays one memory pass per op, so the
step is written to keep passes and [rows, V] temporaries few: in-place updates, p and log p
from one exp, row dot products instead of product-then-sum.
"""

from __future__ import annotations

import torch

from opsd_kernels.divergence_options import RowOptions
from opsd_kernels.types import DivergenceStats

# Log-probabilities are floored here so that a zero probability (a -inf logit, or underflow)
# times its log is 0 * finite = 0 rather than 0 * -inf = NaN; exp(_LOG_FLOOR) is exactly 0.
_LOG_FLOOR = -1.0e30
_TINY = torch.finfo(torch.float32).tiny


def _log_softmax_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn x into log softmax(x) in place; return (log_probs, probs, logsumexp [C])."""
    row_max = x.amax(-1, keepdim=True).clamp_min_(_LOG_FLOOR)
    probs = (x - row_max).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    log_total = total.log_()
    # (x - max) - log Z, not x - (max + log Z): the latter rounds lse at the magnitude of the
    # logits, which is all of log p for a confident row at large |z| or a tiny temperature.
    log_probs = x.sub_(row_max).sub_(log_total).clamp_min_(_LOG_FLOOR)
    return log_probs, probs, (log_total + row_max).squeeze(-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


def divergence_rows_torch_(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                           coef: torch.Tensor, stats: torch.Tensor, opts: RowOptions,
                           write_grad: bool) -> None:
    """Fill `stats` [C, NUM_STATS]; with write_grad, s then holds coef_i * d D_i / d z_S (and
    is left as it was otherwise). t is only read."""
    if not write_grad:
        s = s.clone()  # the step works in place over the student logits
    valid = None if labels is None else labels != opts.ignore_index
    # d s_scaled / d z: a scalar, or per element with soft-capping.
    ds_dz: torch.Tensor | float = opts.inv_tau_s
    if opts.softcap is not None:
        th = torch.tanh(s / opts.softcap)
        s.copy_(th).mul_(opts.softcap * opts.inv_tau_s)
        ds_dz = th.mul_(th).neg_().add_(1).mul_(opts.inv_tau_s)
        t = torch.tanh(t / opts.softcap).mul_(opts.softcap * opts.inv_tau_t)
    else:
        s.mul_(opts.inv_tau_s)
        t = t * opts.inv_tau_t
    needs_s = write_grad and opts.kind != "sampled" and (
        opts.kind != "forward_kl" or opts.clip is not None)
    if needs_s:  # the top token of each row, before s becomes log p
        top = s.argmax(-1, keepdim=True)
        unique_top = (s == s.gather(-1, top)).sum(-1, keepdim=True) == 1
    log_p, p, lse_s = _log_softmax_(s)
    log_q, q, lse_t = _log_softmax_(t)

    zero_rows = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    logp_y = logq_y = zero_rows
    if labels is not None:
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        logp_y = log_p.gather(-1, safe).squeeze(-1)
        logq_y = log_q.gather(-1, safe).squeeze(-1)
    h_p, h_q = -_rowdot(p, log_p), -_rowdot(q, log_q)

    if opts.kind == "sampled":
        advantage = logq_y - logp_y
        loss = -advantage * logp_y
        # a (p_j - [j = y]), with p_y - 1 formed before the product (exact for p_y near 1)
        grad = p.scatter_add_(-1, safe, torch.full_like(logp_y, -1.0).unsqueeze(-1))
        grad.mul_(advantage.unsqueeze(-1))
    else:
        terms, g = _terms_and_weights(log_p, log_q, p, q, opts)
        if opts.clip is not None:
            kept = terms < opts.clip
            loss = torch.where(kept, terms, opts.clip).sum(-1)
            g.mul_(kept)
        else:
            loss = terms.sum(-1)
        del terms
        # d D / d s_j = g_j - p_j S, S = sum_v g_v (g already zeroed on clipped terms); forward
        # KL without clipping has S = -sum_v q_v = -1.
        grad = _minus_p_times_sum_(g, p, top, unique_top) if needs_s else g.add_(p)

    rows = torch.stack(DivergenceStats(
        divergence=loss, student_entropy=h_p, teacher_entropy=h_q, student_lse=lse_s,
        teacher_lse=lse_t, student_logprob=logp_y, teacher_logprob=logq_y), dim=-1)
    if valid is not None:
        rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros_like(rows))
    stats.copy_(rows)

    if write_grad:
        row_coef = coef if valid is None else torch.where(valid, coef, torch.zeros_like(coef))
        if isinstance(ds_dz, torch.Tensor):
            grad.mul_(ds_dz)
            ds_dz = 1.0
        torch.mul(grad, (row_coef * ds_dz).unsqueeze(-1), out=s)
        if valid is not None:
            s.masked_fill_(~valid.unsqueeze(-1), 0.0)  # masked rows may hold inf / NaN logits


def _minus_p_times_sum_(g: torch.Tensor, p: torch.Tensor, top: torch.Tensor,
                        unique_top: torch.Tensor) -> torch.Tensor:
    """g_j - p_j S with S = sum_v g_v, in place over g. On the top token (when unique) it is
    g_top P_rest - p_top G_rest, the sums taken over the other tokens: on a confident row
    (p_top = 1 - 1e-5) g_top - p_top S subtracts nearly equal numbers and loses most of its
    digits (see csrc/cuda/divergence_row.h, which sums the same way)."""
    g_top, p_top = g.gather(-1, top), p.gather(-1, top)
    rest = torch.ones_like(p).scatter_(-1, top, 0.0)
    g_rest = _rowdot(g, rest).unsqueeze(-1)
    p_rest = _rowdot(p, rest).unsqueeze(-1)
    grad = g.addcmul_(p, g_top + g_rest, value=-1)
    at_top = torch.where(unique_top, g_top * p_rest - p_top * g_rest, grad.gather(-1, top))
    return grad.scatter_(-1, top, at_top)


def _terms_and_weights(
    log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor, q: torch.Tensor, opts: RowOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vocab terms l_v and g_v, where d l_v / d s_j = g_v (delta_vj - p_j).

    Consumes its inputs: log_q and q may be overwritten (p and log_p are still needed)."""
    if opts.kind == "forward_kl":
        terms = torch.sub(log_q, log_p).mul_(q)
        return terms, q.neg_()
    if opts.kind == "reverse_kl":
        log_ratio = torch.sub(log_p, log_q)
        terms = log_ratio * p
        return terms, log_ratio.add_(1).mul_(p)
    # The mixture in probability space: one log instead of a logaddexp. m >= (1 - beta) p and
    # m >= beta q keep log m accurate wherever its term is not 0; the floor at the smallest
    # normal float only touches m that underflowed, whose terms are 0 (no 0 * inf NaN).
    log_m = (q * opts.beta).add_(p, alpha=1 - opts.beta).clamp_min_(_TINY).log_()
    q_log_qm = log_q.sub_(log_m).mul_(q)
    p_log_pm = torch.sub(log_p, log_m, out=log_m).mul_(p)
    terms = q_log_qm.mul_(opts.beta).add_(p_log_pm, alpha=1 - opts.beta)
    return terms, p_log_pm.mul_(1 - opts.beta)
