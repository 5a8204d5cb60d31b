"""Naive per-token divergences on full logits: the oracle every kernel is tested against.

Everything here materialises [N, V] tensors and is differentiated by autograd. Run it in
float64 for a reference; never use it on large inputs.

Conventions (TRL's `generalized_jsd_loss` and the OPSD reference code):
    s = softcap(z_S) / tau_S, t = softcap(z_T) / tau_T,
    log p = log_softmax(s), log q = log_softmax(t)
    forward_kl  = KL(q || p) = sum_v q_v (log q_v - log p_v)            (jsd with beta = 0)
    reverse_kl  = KL(p || q) = sum_v p_v (log p_v - log q_v)            (jsd with beta = 1)
    jsd(beta)   = beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p
    sampled     = -a log p(y),  a = log q(y) - log p(y) detached        (y = the label)
    clip c      : D = sum_v min(l_v, c) over the per-vocab terms l_v of the divergence.
"""

from __future__ import annotations

import math

import torch

from opsd_kernels.types import DivergenceKind, TopKSource


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def _xlogy_diff(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x (log x - log y) with the 0 log 0 = 0 convention, so underflowed mass gives 0, not NaN."""
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x))


def divergence_terms(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: DivergenceKind, beta: float
) -> torch.Tensor:
    """Per-vocab terms l_v whose sum over the last dim is the divergence."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _xlogy_diff(q, log_q, log_p)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _xlogy_diff(p, log_p, log_q)
    if kind == "jsd":
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        return beta * _xlogy_diff(q, log_q, log_m) + (1 - beta) * _xlogy_diff(p, log_p, log_m)
    raise ValueError(f"divergence_terms: unknown divergence {kind!r}")


def _top_k_support(
    s: torch.Tensor, t: torch.Tensor, top_k: int, source: TopKSource, tail_bucket: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both roles' scaled logits to the top-k of `source`, optionally plus a tail bucket.

    Renormalised: log_softmax over the k kept logits. Tail bucket: one extra "logit" holding the
    log-sum-exp of everything outside the support, so that softmax over the k + 1 entries is the
    true probability of each kept token plus the remaining mass.
    """
    idx = (t if source == "teacher" else s).topk(top_k, dim=-1).indices
    s_k, t_k = s.gather(-1, idx), t.gather(-1, idx)
    if not tail_bucket:
        return s_k, t_k
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    s_tail = torch.where(outside, s, neg_inf).logsumexp(-1, keepdim=True)
    t_tail = torch.where(outside, t, neg_inf).logsumexp(-1, keepdim=True)
    return torch.cat([s_k, s_tail], -1), torch.cat([t_k, t_tail], -1)


def reference_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: DivergenceKind = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    top_k: int | None = None,
    top_k_source: TopKSource = "teacher",
    tail_bucket: bool = False,
    clip: float | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """Per-token loss and by-products for logits [N, V]; rows whose label is ignore_index are 0.

    Returns a dict of [N] tensors: divergence (the per-token loss, differentiable w.r.t. the
    student logits), student_entropy, teacher_entropy (of the distributions the divergence
    compares: the top-k ones when top_k is set), student_lse, teacher_lse (of the full scaled
    logits), student_logprob, teacher_logprob (full-vocab log-probs of the label; 0 without labels).
    """
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    s = apply_softcap(student_logits, logit_softcap) / temperature
    t = apply_softcap(teacher_logits.detach(), logit_softcap) / tau_t
    lse_s, lse_t = s.logsumexp(-1), t.logsumexp(-1)

    n = s.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=s.device)
    logprob_s = logprob_t = torch.zeros(n, dtype=s.dtype, device=s.device)
    if labels is not None:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        logprob_s = s.gather(-1, safe).squeeze(-1) - lse_s
        logprob_t = t.gather(-1, safe).squeeze(-1) - lse_t

    if divergence == "sampled":
        advantage = (logprob_t - logprob_s).detach()
        loss = -advantage * logprob_s
        s_d, t_d = s, t
    else:
        s_d, t_d = s, t
        if top_k is not None:
            s_d, t_d = _top_k_support(s, t, top_k, top_k_source, tail_bucket)
        terms = divergence_terms(s_d.log_softmax(-1), t_d.log_softmax(-1), divergence, beta)
        if clip is not None:
            terms = torch.where(terms < clip, terms, torch.full_like(terms, clip))
        loss = terms.sum(-1)

    def entropy(x: torch.Tensor) -> torch.Tensor:
        log_x = x.detach().log_softmax(-1)
        return -torch.where(log_x > -math.inf, log_x.exp() * log_x, 0.0).sum(-1)

    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    out = {
        "divergence": loss,
        "student_entropy": entropy(s_d),
        "teacher_entropy": entropy(t_d),
        "student_lse": lse_s.detach(),
        "teacher_lse": lse_t,
        "student_logprob": logprob_s.detach(),
        "teacher_logprob": logprob_t,
    }
    return {k: torch.where(valid, v, zero) for k, v in out.items()}


def reference_reduce(
    per_token: torch.Tensor,
    valid: torch.Tensor,
    *,
    token_weights: torch.Tensor | None,
    reduction: str,
    num_items: float | torch.Tensor | None,
    batch_shape: tuple[int, ...],
) -> torch.Tensor:
    """Reduce per-token losses [N] as `fused_linear_divergence` documents."""
    weighted = per_token if token_weights is None else per_token * token_weights
    weighted = torch.where(valid, weighted, torch.zeros_like(weighted))
    if reduction == "none":
        return weighted.reshape(batch_shape)
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        denom = valid.sum().clamp_min(1) if num_items is None else num_items
        return weighted.sum() / denom
    if reduction == "sequence_mean":
        counts = valid.reshape(batch_shape).sum(-1)
        per_seq = weighted.reshape(batch_shape).sum(-1) / counts.clamp_min(1)
        denom = (counts > 0).sum().clamp_min(1) if num_items is None else num_items
        return per_seq.sum() / denom
    raise ValueError(f"reduction: unknown value {reduction!r}")
