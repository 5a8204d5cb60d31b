"""The per-row divergence step in plain PyTorch: the CPU fallback of `ops/divergence.py`.

Same contract as the Triton launcher `divergence_rows_triton_`: given raw logits of both roles
for a block of rows, write per-row statistics and (optionally) d loss / d student logits in
place of the student logits. The gradient is analytic (see `ops/divergence.py` for the
derivation); autograd is not used, so the step holds only a few [rows, V] fp32 temporaries.
"""

from __future__ import annotations

import torch

from opsd_kernels.row_options import RowOptions

_NEG_INF = float("-inf")


def _scaled(z: torch.Tensor, inv_tau: float, softcap: float | None) -> tuple[torch.Tensor, ...]:
    """(s, d s / d z) for s = softcap(z) / tau."""
    if softcap is None:
        return z * inv_tau, torch.full((), inv_tau, dtype=z.dtype, device=z.device)
    th = torch.tanh(z / softcap)
    return th * (softcap * inv_tau), (1 - th * th) * inv_tau


def _guarded(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value where x > 0, else 0: the 0 log 0 = 0 convention, NaN-free for underflowed mass."""
    return torch.where(x > 0, value, torch.zeros((), dtype=value.dtype, device=value.device))


def divergence_rows_torch_(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    stats: torch.Tensor,
    opts: RowOptions,
    write_grad: bool,
) -> None:
    """Fill `stats` [C, NUM_STATS]; if write_grad, overwrite `s` with coef_i * d D_i / d z_S."""
    valid = None if labels is None else labels != opts.ignore_index
    log_p, ds_dz = _scaled(s, opts.inv_tau_s, opts.softcap)
    log_q, _ = _scaled(t, opts.inv_tau_t, opts.softcap)
    lse_s, lse_t = log_p.logsumexp(-1, keepdim=True), log_q.logsumexp(-1, keepdim=True)
    log_p.sub_(lse_s)
    log_q.sub_(lse_t)
    p, q = log_p.exp(), log_q.exp()

    zero_rows = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    logp_y = logq_y = zero_rows
    if labels is not None:
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        logp_y = log_p.gather(-1, safe).squeeze(-1)
        logq_y = log_q.gather(-1, safe).squeeze(-1)

    if opts.kind == "sampled":
        advantage = logq_y - logp_y
        loss = -advantage * logp_y
        grad = p * advantage.unsqueeze(-1)
        grad.scatter_add_(-1, safe, -advantage.unsqueeze(-1))
    else:
        terms, g = _terms_and_weights(log_p, log_q, p, q, opts)
        if opts.clip is not None:
            kept = terms < opts.clip
            terms = torch.where(kept, terms, torch.full_like(terms, opts.clip))
            g = torch.where(kept, g, torch.zeros_like(g))
        loss = terms.sum(-1)
        del terms
        # d D / d s_j = g_j - p_j sum_v g_v  (g already zeroed on clipped terms)
        grad = g.sub_(p * g.sum(-1, keepdim=True))

    h_p = -torch.mul(p, log_p).nan_to_num_(nan=0.0).sum(-1)  # 0 * -inf: p underflowed to 0
    h_q = -torch.mul(q, log_q).nan_to_num_(nan=0.0).sum(-1)
    rows = torch.stack([loss, h_p, h_q, lse_s[:, 0], lse_t[:, 0], logp_y, logq_y], dim=-1)
    if valid is not None:
        rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros_like(rows))
    stats.copy_(rows)

    if write_grad:
        row_coef = coef if valid is None else torch.where(valid, coef, torch.zeros_like(coef))
        s.copy_(grad.mul_(ds_dz).mul_(row_coef.unsqueeze(-1)))


def _terms_and_weights(
    log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor, q: torch.Tensor, opts: RowOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vocab terms l_v and g_v, where d l_v / d s_j = g_v (delta_vj - p_j)."""
    if opts.kind == "forward_kl":
        return _guarded(q, q * (log_q - log_p)), -q
    if opts.kind == "reverse_kl":
        ratio = log_p - log_q
        return _guarded(p, p * ratio), _guarded(p, p * (ratio + 1))
    # The mixture in probability space: one log instead of a logaddexp, and exact enough, since
    # m >= (1 - beta) p and m >= beta q keep log m accurate wherever a term is not guarded to 0.
    log_m = (q * opts.beta).add_(p, alpha=1 - opts.beta).log_()
    p_log_pm = _guarded(p, p * (log_p - log_m))
    terms = opts.beta * _guarded(q, q * (log_q - log_m)) + (1 - opts.beta) * p_log_pm
    return terms, p_log_pm.mul_(1 - opts.beta)
