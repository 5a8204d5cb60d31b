"""The fused divergence when each rank holds a slice of the vocabulary (a tensor-parallel or
row-sharded lm_head): no rank ever holds the full head or a full-vocabulary row.

Every rank has the same tokens' hidden states and rows [vocab_start, vocab_start + V_r) of the
head. Per chunk of tokens, each rank forms its slice's logits (fp32) and the ranks combine a
few floats per token with three all-reduces:
    1. max of each role's scaled logits, 2. their rescaled sums of exponentials -> the global
       log-sum-exps A_s, A_t, so log p = s - A_s and log q = t - A_t on every slice;
    3. the sums over the vocabulary of the slice's terms: the divergence D, the entropies,
       S = sum_v g_v (the gradient's row reduction, see ops/divergence.py) and the label's
       log-probabilities (from the rank that owns the label).
The gradient with respect to the slice's logits is then local, d D / d s_j = g_j - p_j S, so
the slice's weight gradient is local too and the hidden-state gradient is one all-reduce of
[N, H] at the end (the sum of every slice's contribution).

Supported: every divergence ("jsd", "forward_kl", "reverse_kl", "sampled"), clipping,
separate temperatures, logit soft-capping, token weights, ignore_index, reductions "mean",
"sum" and "none", a shared or separate teacher head. Not supported, refused with an error:
top-k (the top-k support is a global selection; it would need each slice's k candidates
gathered per token), biases, "sequence_mean".
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_kernels import _validate as v
from opsd_kernels.types import DivergenceKind

_TINY = 1.1754944e-38  # smallest normal fp32: keeps log m finite where p is subnormal
# Columns of the third all-reduce.
_D, _S, _HP, _HQ, _LOGP_Y, _LOGQ_Y = range(6)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _scale(z: torch.Tensor, inv_tau: float, softcap: float | None
           ) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(s, ds/dz) of raw logits z."""
    if softcap is None:
        return z * inv_tau, inv_tau
    th = torch.tanh(z / softcap)
    return th * (softcap * inv_tau), (1.0 - th * th) * inv_tau


def _xlog_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x))


def _terms(log_p, log_q, p, q, kind: str, beta: float, clip: float | None):
    """Per-vocab terms l_v and weights g_v = d l_v / d log p_v (ops/divergence.py)."""
    if kind == "forward_kl":
        terms, g = _xlog_ratio(q, log_q, log_p), -q
    elif kind == "reverse_kl":
        terms = _xlog_ratio(p, log_p, log_q)
        g = torch.where(p > 0, p * (log_p - log_q + 1.0), torch.zeros_like(p))
    else:
        log_m = torch.log(torch.clamp(beta * q + (1.0 - beta) * p, min=_TINY))
        p_log_pm = _xlog_ratio(p, log_p, log_m)
        terms = beta * _xlog_ratio(q, log_q, log_m) + (1.0 - beta) * p_log_pm
        g = (1.0 - beta) * p_log_pm
    if clip is not None:
        kept = terms < clip
        terms = torch.where(kept, terms, torch.full_like(terms, clip))
        g = torch.where(kept, g, torch.zeros_like(g))
    return terms, g


def _entropy(x: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, -x * log_x, torch.zeros_like(x)).sum(-1)


class _Options:
    def __init__(self, kind, beta, tau_s, tau_t, clip, softcap, ignore_index, vocab_start,
                 group):
        if kind == "jsd" and beta == 0.0:
            kind = "forward_kl"  # TRL's endpoints: the mixture formula vanishes there
        elif kind == "jsd" and beta == 1.0:
            kind = "reverse_kl"
        self.kind, self.beta, self.clip, self.softcap = kind, beta, clip, softcap
        self.inv_tau_s, self.inv_tau_t = 1.0 / tau_s, 1.0 / tau_t
        self.ignore_index, self.vocab_start, self.group = ignore_index, vocab_start, group


def _chunk(h_s, w_s, h_t, w_t, labels, valid, coef, o: _Options, need_grad: bool):
    """One chunk of rows: per-token (D, H_p, H_q, log p_y, log q_y) [C, 5] and, when
    `need_grad`, coef-scaled d loss / d z_S on this slice [C, V_r]."""
    z_s = h_s.float() @ w_s.float().T
    z_t = h_t.float() @ w_t.float().T
    s, ds_dz = _scale(z_s, o.inv_tau_s, o.softcap)
    t, _ = _scale(z_t, o.inv_tau_t, o.softcap)
    # 1-2: global log-sum-exps from each slice's max and rescaled sum.
    local_max = torch.stack([s.amax(-1), t.amax(-1)], -1)
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, o.group)
    sums = torch.stack([(s - global_max[:, :1]).exp().sum(-1),
                        (t - global_max[:, 1:]).exp().sum(-1)], -1)
    lse = global_max + _all_reduce(sums, dist.ReduceOp.SUM, o.group).log()
    log_p, log_q = s - lse[:, :1], t - lse[:, 1:]
    p, q = log_p.exp(), log_q.exp()
    # 3: the vocabulary sums of this slice.
    parts = torch.zeros(s.shape[0], 6, dtype=torch.float32, device=s.device)
    if labels is not None:
        local = labels - o.vocab_start
        owned = valid & (local >= 0) & (local < s.shape[1])
        safe = torch.where(owned, local, torch.zeros_like(local)).unsqueeze(-1)
        zero = torch.zeros((), device=s.device)
        parts[:, _LOGP_Y] = torch.where(owned, log_p.gather(-1, safe).squeeze(-1), zero)
        parts[:, _LOGQ_Y] = torch.where(owned, log_q.gather(-1, safe).squeeze(-1), zero)
    parts[:, _HP] = _entropy(p, log_p)
    parts[:, _HQ] = _entropy(q, log_q)
    if o.kind != "sampled":
        terms, g = _terms(log_p, log_q, p, q, o.kind, o.beta, o.clip)
        parts[:, _D] = terms.sum(-1)
        parts[:, _S] = g.sum(-1)
    totals = _all_reduce(parts, dist.ReduceOp.SUM, o.group)
    advantage = totals[:, _LOGQ_Y] - totals[:, _LOGP_Y]
    loss = -advantage * totals[:, _LOGP_Y] if o.kind == "sampled" else totals[:, _D]
    stats = torch.stack([loss, totals[:, _HP], totals[:, _HQ], totals[:, _LOGP_Y],
                         totals[:, _LOGQ_Y]], -1)
    stats = torch.where(valid.unsqueeze(-1), stats, torch.zeros_like(stats))
    if not need_grad:
        return stats, None
    if o.kind == "sampled":
        grad = p * advantage.unsqueeze(-1)
        if labels is not None:
            grad.scatter_add_(-1, safe, torch.where(owned, -advantage, 0.0).unsqueeze(-1))
    else:
        grad = g - p * totals[:, _S:_S + 1]
    return stats, grad * ds_dz * torch.where(valid, coef, 0.0).unsqueeze(-1)


class _VocabParallelDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, token_weights, o, reduction, chunk_size,
                reduce_hidden_grad):
        n = h_s.shape[0]
        valid = (labels != o.ignore_index if labels is not None
                 else torch.ones(n, dtype=torch.bool, device=h_s.device))
        weights = (token_weights.float() if token_weights is not None
                   else torch.ones(n, device=h_s.device))
        # Gradients are finished here for "mean" / "sum" (backward only scales them); "none"
        # needs the per-token upstream gradient, so its backward sweeps again.
        scale = weights / valid.sum().clamp_min(1) if reduction == "mean" else weights
        need_grad = reduction != "none" and (h_s.requires_grad or w_s.requires_grad)
        per_token, grad_h, grad_w = _sweep(h_s, w_s, h_t, w_t, labels, valid, scale, o,
                                           chunk_size, need_grad, reduce_hidden_grad)
        ctx.o, ctx.reduction, ctx.chunk_size = o, reduction, chunk_size
        ctx.reduce_hidden_grad = reduce_hidden_grad
        ctx.grads = (grad_h, grad_w)
        ctx.save_for_backward(h_s, w_s, h_t, w_t, labels, valid, weights)
        ctx.needs = (h_s.requires_grad, w_s.requires_grad)
        weighted = torch.where(valid, per_token[:, 0] * weights, 0.0)
        if reduction == "none":
            return weighted.to(h_s.dtype)
        total = weighted.sum()
        return (total / valid.sum().clamp_min(1) if reduction == "mean" else total).to(h_s.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        h_s, w_s, h_t, w_t, labels, valid, weights = ctx.saved_tensors
        if ctx.reduction == "none":
            _, grad_h, grad_w = _sweep(h_s, w_s, h_t, w_t, labels, valid,
                                       weights * grad_out.float(), ctx.o, ctx.chunk_size, True,
                                       ctx.reduce_hidden_grad)
        else:
            grad_h, grad_w = ctx.grads
            grad_h = grad_h * grad_out if grad_h is not None else None
            grad_w = grad_w * grad_out if grad_w is not None else None
        need_h, need_w = ctx.needs
        return (grad_h.to(h_s.dtype) if need_h and grad_h is not None else None,
                grad_w.to(w_s.dtype) if need_w and grad_w is not None else None,
                None, None, None, None, None, None, None, None)


def _sweep(h_s, w_s, h_t, w_t, labels, valid, coef, o, chunk_size, need_grad,
           reduce_hidden_grad):
    n = h_s.shape[0]
    stats = torch.empty(n, 5, dtype=torch.float32, device=h_s.device)
    grad_h = torch.zeros(n, h_s.shape[1], dtype=torch.float32, device=h_s.device) \
        if need_grad and h_s.requires_grad else None
    grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) \
        if need_grad and w_s.requires_grad else None
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            chunk_stats, g = _chunk(h_s[rows], w_s, h_t[rows], w_t,
                                    labels[rows] if labels is not None else None, valid[rows],
                                    coef[rows], o, need_grad)
            stats[rows] = chunk_stats
            if grad_h is not None:
                grad_h[rows] = g @ w_s.float()
            if grad_w is not None:
                grad_w += g.T @ h_s[rows].float()
        if grad_h is not None and reduce_hidden_grad:
            _all_reduce(grad_h, dist.ReduceOp.SUM, o.group)
    return stats, grad_h, grad_w


def vocab_parallel_linear_divergence(
    student_hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight_shard: torch.Tensor | None = None,
    *,
    vocab_start: int,
    vocab_size: int,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    divergence: DivergenceKind = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    clip: float | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    logit_softcap: float | None = None,
    group: dist.ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
    chunk_size: int = 1024,
    top_k: int | None = None,
) -> torch.Tensor:
    """:func:`opsd_kernels.fused_linear_divergence` with the head split by vocabulary rows
    across the ranks of `group`; every rank gets the same loss.

    Args:
        student_hidden: [N, H] the tokens' hidden states, the same on every rank.
        weight_shard: [V_r, H] this rank's rows of the head: token ids
            [vocab_start, vocab_start + V_r); the ranks' slices tile [0, vocab_size).
        teacher_hidden: [N, H] (no grad); teacher_weight_shard: this rank's rows of a separate
            teacher head, or None to share ``weight_shard``.
        labels: [N] global token ids (for "sampled" and for masking with ``ignore_index``).
        reduce_hidden_grad: all-reduce the student hidden gradient (each slice contributes
            part of it) so every rank holds the full gradient; False leaves each rank its own
            part, for a framework that reduces it itself.
        chunk_size: rows per sweep step: the [chunk, V_r] fp32 logits of both roles.
        Every other argument as in fused_linear_divergence; top-k, biases and "sequence_mean"
        are not supported (see the module docstring).

    Returns:
        The loss: a scalar, or [N] per-token values for reduction "none".
    """
    v.check(top_k is None, "top_k: not supported in the vocabulary-parallel form (the top-k "
            "support is a selection over the whole vocabulary)")
    v.check(reduction != "sequence_mean", "reduction: 'sequence_mean' is not supported in the "
            "vocabulary-parallel form")
    v.check_options(divergence=divergence, beta=beta, temperature=temperature,
                    teacher_temperature=teacher_temperature, top_k=None,
                    top_k_source="teacher", tail_bucket=False, clip=clip,
                    logit_softcap=logit_softcap, reduction=reduction, vocab=vocab_size,
                    has_labels=labels is not None, chunk_size=chunk_size)
    if student_hidden.dim() != 2 or teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"student_hidden / teacher_hidden: expected two [N, H] tensors of one "
                         f"shape, got {tuple(student_hidden.shape)} and "
                         f"{tuple(teacher_hidden.shape)}")
    if teacher_hidden.requires_grad:
        raise ValueError("teacher_hidden: must not require grad (the teacher is a fixed target)")
    teacher_weight_shard = weight_shard if teacher_weight_shard is None else teacher_weight_shard
    for name, w in (("weight_shard", weight_shard), ("teacher_weight_shard",
                                                     teacher_weight_shard)):
        if w.dim() != 2 or w.shape[1] != student_hidden.shape[1]:
            raise ValueError(f"{name}: expected [V_r, {student_hidden.shape[1]}], got "
                             f"{tuple(w.shape)}")
    if teacher_weight_shard.shape[0] != weight_shard.shape[0]:
        raise ValueError("teacher_weight_shard: must hold the same vocabulary rows as "
                         "weight_shard")
    if not 0 <= vocab_start <= vocab_size - weight_shard.shape[0]:
        raise ValueError(f"vocab_start: {vocab_start} with {weight_shard.shape[0]} rows lies "
                         f"outside the vocabulary [0, {vocab_size})")
    if labels is not None:
        v.check_labels(labels, student_hidden.shape[:1], vocab_size, ignore_index)
    if token_weights is not None:
        v.check_token_weights(token_weights, student_hidden.shape[:1])
    options = _Options(divergence, beta, temperature,
                       temperature if teacher_temperature is None else teacher_temperature,
                       clip, logit_softcap, ignore_index, vocab_start, group)
    return _VocabParallelDivergence.apply(
        student_hidden, weight_shard, teacher_hidden.detach(), teacher_weight_shard.detach(),
        labels, token_weights, options, reduction, chunk_size, reduce_hidden_grad)
