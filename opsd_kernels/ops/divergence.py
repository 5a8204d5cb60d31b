"""Triton kernel for the per-row divergence step, and its launcher.

One program per row of a [C, V] block holding raw logits of both roles. It computes both
log-sum-exps, the per-token divergence with its by-products, and writes
coef_i * d D_i / d z_S in place of the student logits. fp32 accumulation throughout; the
logits buffers are fp32 (the GEMM output is never rounded to bf16 before the softmax).

Derivation (s = softcap(z) / tau, p = softmax(s), q = softmax(t), one row):
    Every divergence is D = sum_v l_v with per-vocab terms l_v(p, q). Writing
    g_v = d l_v / d log p_v (q fixed) and using d log p_v / d s_j = delta_vj - p_j,
        d l_v / d s_j = g_v (delta_vj - p_j)   =>   d D / d s_j = g_j - p_j S,  S = sum_v g_v.
    forward KL  l_v = q_v (log q_v - log p_v)                 g_v = -q_v          S = -1
    reverse KL  l_v = p_v (log p_v - log q_v)                 g_v = p_v (r_v + 1), r_v = log p_v/q_v
    JSD(beta)   l_v = beta q_v log(q_v/m_v) + (1-beta) p_v log(p_v/m_v), m = beta q + (1-beta) p
                                                          g_v = (1-beta) p_v log(p_v/m_v)
        (the q_v/m_v and p_v/m_v terms of d l_v / d p_v cancel: beta q_v + (1-beta) p_v = m_v).
    Clipping D = sum_v min(l_v, c): the same with g_v zeroed where l_v >= c, so S needs its own
    pass over the row unless it has a closed form (forward KL unclipped).
    Sampled: D = -a log p_y with a = log q_y - log p_y held constant,
        d D / d s_j = a (p_j - [j = y]).
    Chain rule: d s / d z = (1 - tanh^2(z / cap)) / tau with soft-capping, 1 / tau without.
Masked lanes load -inf; every x log x term is guarded by x > 0, so underflowed mass (and the
mixture of two underflowed distributions) contributes 0, never NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opsd_kernels.divergence_options import KIND_CODES, RowOptions
from opsd_kernels.types import StatColumn

# Kind codes and stats columns from their one Python definition (shared with the native kernels).
FORWARD_KL: tl.constexpr = tl.constexpr(KIND_CODES["forward_kl"])
REVERSE_KL: tl.constexpr = tl.constexpr(KIND_CODES["reverse_kl"])
JSD: tl.constexpr = tl.constexpr(KIND_CODES["jsd"])
SAMPLED: tl.constexpr = tl.constexpr(KIND_CODES["sampled"])
STAT_DIVERGENCE: tl.constexpr = tl.constexpr(int(StatColumn.divergence))
STAT_STUDENT_ENTROPY: tl.constexpr = tl.constexpr(int(StatColumn.student_entropy))
STAT_TEACHER_ENTROPY: tl.constexpr = tl.constexpr(int(StatColumn.teacher_entropy))
STAT_STUDENT_LSE: tl.constexpr = tl.constexpr(int(StatColumn.student_lse))
STAT_TEACHER_LSE: tl.constexpr = tl.constexpr(int(StatColumn.teacher_lse))
STAT_STUDENT_LOGPROB: tl.constexpr = tl.constexpr(int(StatColumn.student_logprob))
STAT_TEACHER_LOGPROB: tl.constexpr = tl.constexpr(int(StatColumn.teacher_logprob))

# A finite floor for running maxima: exp(-inf - floor) = 0 where exp(-inf - -inf) would be NaN.
_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _scaled(ptr, cols, in_row, inv_tau, softcap, HAS_SOFTCAP: tl.constexpr):
    """(s, d s / d z) of one tile; -inf on lanes past the row end."""
    z = tl.load(ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly at +-1 for large |x|.
        th = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
        s = th * (softcap * inv_tau)
        ds_dz = (1.0 - th * th) * inv_tau
    else:
        s = z * inv_tau
        ds_dz = tl.zeros_like(z) + inv_tau
    return tl.where(in_row, s, float("-inf")), ds_dz


@triton.jit
def _xlog_ratio(x, log_x, log_y):
    return tl.where(x > 0.0, x * (log_x - log_y), 0.0)


@triton.jit
def _tile_terms(log_p, log_q, p, q, in_row, beta, clip,
                KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
    """Per-vocab terms l_v (clipped) and weights g_v of one tile (see the module docstring)."""
    if KIND == FORWARD_KL:
        terms = _xlog_ratio(q, log_q, log_p)
        g = -q
    elif KIND == REVERSE_KL:
        terms = _xlog_ratio(p, log_p, log_q)
        g = tl.where(p > 0.0, p * (log_p - log_q + 1.0), 0.0)
    else:
        # m >= beta q and m >= (1 - beta) p: log m is accurate wherever a term is not guarded.
        # The floor at the smallest normal float keeps a subnormal p from meeting m = 0.
        log_m = tl.log(tl.maximum(beta * q + (1.0 - beta) * p, 1.1754944e-38))
        p_log_pm = _xlog_ratio(p, log_p, log_m)
        terms = beta * _xlog_ratio(q, log_q, log_m) + (1.0 - beta) * p_log_pm
        g = (1.0 - beta) * p_log_pm
    if HAS_CLIP:
        kept = terms < clip
        terms = tl.where(kept, terms, clip)
        g = tl.where(kept, g, 0.0)
    return tl.where(in_row, terms, 0.0), tl.where(in_row, g, 0.0)


@triton.jit
def _entropy_terms(x, log_x):
    return tl.where(x > 0.0, -x * log_x, 0.0)


@triton.jit
def divergence_rows_kernel(
    s_ptr, s_stride, t_ptr, t_stride, labels_ptr, coef_ptr, stats_ptr,
    V, ignore_index, beta, inv_tau_s, inv_tau_t, clip, softcap,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK_V)

    valid = row >= 0  # a boolean scalar tensor, True
    label = row * 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        label = tl.where(valid, label, 0)
    # Masked rows skip every read pass (their loop bound is 0) and only get zeros written.
    v_read = tl.where(valid, V, 0)

    # Pass 1: online log-sum-exp of both roles.
    m_s = _FLOOR + tl.zeros((), tl.float32)
    m_t = _FLOOR + tl.zeros((), tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    for start in range(0, v_read, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        s, _ = _scaled(s_row, cols, in_row, inv_tau_s, softcap, HAS_SOFTCAP)
        t, _ = _scaled(t_row, cols, in_row, inv_tau_t, softcap, HAS_SOFTCAP)
        new_m_s = tl.maximum(m_s, tl.max(s, 0))
        new_m_t = tl.maximum(m_t, tl.max(t, 0))
        z_s = z_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(s - new_m_s), 0)
        z_t = z_t * tl.exp(m_t - new_m_t) + tl.sum(tl.exp(t - new_m_t), 0)
        m_s = new_m_s
        m_t = new_m_t
    # log p = (s - m) - log Z, never s - (m + log Z): the sum would round at the size of the
    # logits, which is all of log p for a confident row at large |z| or a tiny temperature.
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)

    logp_y = tl.zeros((), tl.float32)
    logq_y = tl.zeros((), tl.float32)
    if HAS_LABELS:
        # Read before pass 3 overwrites the student row with its gradient.
        y_cols = label + tl.zeros([1], tl.int64)
        # Both bounds: labels outside [0, V) are refused on the host, but not while
        # torch.compile traces (the check would read the device), and a negative one would
        # read before the row (before the buffer, on row 0).
        y_in_row = (y_cols >= 0) & (y_cols < V)
        # Names of their own: a [1]-shaped `_` here would be re-assigned a [BLOCK_V] tile by
        # the loops below, which a GPU build rejects as a loop-carried type change.
        s_y, _ds_y = _scaled(s_row, y_cols, y_in_row, inv_tau_s, softcap, HAS_SOFTCAP)
        t_y, _dt_y = _scaled(t_row, y_cols, y_in_row, inv_tau_t, softcap, HAS_SOFTCAP)
        logp_y = (tl.sum(s_y, 0) - m_s) - log_z_s
        logq_y = (tl.sum(t_y, 0) - m_t) - log_z_t
    advantage = logq_y - logp_y

    # Pass 2, only where S = sum_v g_v has no closed form: the divergence, entropies and S.
    # The top token (s_v == max s, when unique) is summed apart: its gradient g_top - p_top S is
    # taken as g_top P_rest - p_top G_rest (sums over the other tokens), which on a confident
    # row (p_top = 1 - 1e-5) does not subtract nearly equal numbers.
    NEEDS_S: tl.constexpr = (KIND == REVERSE_KL) or (KIND == JSD) or HAS_CLIP
    loss = tl.zeros((), tl.float32)
    h_p = tl.zeros((), tl.float32)
    h_q = tl.zeros((), tl.float32)
    g_sum = tl.zeros((), tl.float32) - 1.0  # forward KL: S = -sum_v q_v = -1
    g_rest = tl.zeros((), tl.float32)
    p_rest = tl.zeros((), tl.float32)
    n_top = tl.zeros((), tl.float32)
    if NEEDS_S:
        g_sum = tl.zeros((), tl.float32)
        for start in range(0, v_read, BLOCK_V):
            cols = start + offs
            in_row = cols < V
            s, _ = _scaled(s_row, cols, in_row, inv_tau_s, softcap, HAS_SOFTCAP)
            t, _ = _scaled(t_row, cols, in_row, inv_tau_t, softcap, HAS_SOFTCAP)
            log_p = (s - m_s) - log_z_s
            log_q = (t - m_t) - log_z_t
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            terms, g = _tile_terms(log_p, log_q, p, q, in_row, beta, clip, KIND, HAS_CLIP)
            loss += tl.sum(terms, 0)
            is_top = s == m_s
            g_sum += tl.sum(g, 0)
            g_rest += tl.sum(tl.where(is_top, 0.0, g), 0)
            p_rest += tl.sum(tl.where(is_top, 0.0, p), 0)
            n_top += tl.sum(tl.where(is_top, 1.0, 0.0), 0)
            h_p += tl.sum(_entropy_terms(p, log_p), 0)
            h_q += tl.sum(_entropy_terms(q, log_q), 0)

    # Pass 3: the gradient (and, where pass 2 was skipped, the divergence and entropies).
    coef = tl.where(valid, tl.load(coef_ptr + row), 0.0)
    if WRITE_GRAD or not NEEDS_S:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_row = cols < V
            read = cols < v_read
            s, ds_dz = _scaled(s_row, cols, read, inv_tau_s, softcap, HAS_SOFTCAP)
            t, _ = _scaled(t_row, cols, read, inv_tau_t, softcap, HAS_SOFTCAP)
            log_p = (s - m_s) - log_z_s
            log_q = (t - m_t) - log_z_t
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            if KIND == SAMPLED:
                grad = advantage * (p - tl.where(cols == label, 1.0, 0.0))
            else:
                terms, g = _tile_terms(log_p, log_q, p, q, read, beta, clip, KIND, HAS_CLIP)
                unique_top = tl.where(s == m_s, n_top, 0.0) == 1.0
                grad = tl.where(unique_top, g * p_rest - p * g_rest, g - p * g_sum)
                if not NEEDS_S:
                    loss += tl.sum(terms, 0)
            if not NEEDS_S:
                h_p += tl.sum(_entropy_terms(p, log_p), 0)
                h_q += tl.sum(_entropy_terms(q, log_q), 0)
            if WRITE_GRAD:
                grad = tl.where(read, grad * ds_dz * coef, 0.0)
                tl.store(s_row + cols, grad, mask=in_row)

    if KIND == SAMPLED:
        loss = -advantage * logp_y
    out = stats_ptr + row * NUM_STATS
    tl.store(out + STAT_DIVERGENCE, tl.where(valid, loss, 0.0))
    tl.store(out + STAT_STUDENT_ENTROPY, tl.where(valid, h_p, 0.0))
    tl.store(out + STAT_TEACHER_ENTROPY, tl.where(valid, h_q, 0.0))
    tl.store(out + STAT_STUDENT_LSE, tl.where(valid, m_s + log_z_s, 0.0))
    tl.store(out + STAT_TEACHER_LSE, tl.where(valid, m_t + log_z_t, 0.0))
    tl.store(out + STAT_STUDENT_LOGPROB, tl.where(valid, logp_y, 0.0))
    tl.store(out + STAT_TEACHER_LOGPROB, tl.where(valid, logq_y, 0.0))


def launch_config(vocab: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of a launch over rows of `vocab` columns: one 4096-wide tile at a
    time on a GPU (1024 under the interpreter, which runs numpy per program)."""
    block_v = min(triton.next_power_of_2(vocab), 4096 if on_gpu else 1024)
    return block_v, 8 if block_v >= 2048 else 4


def divergence_rows_triton_(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    stats: torch.Tensor,
    opts: RowOptions,
    write_grad: bool,
) -> None:
    """Launch one program per row. s, t: fp32 [C, V] with unit column stride (s is overwritten
    with the gradient when write_grad); labels int64 [C] or None; coef fp32 [C]; stats fp32
    [C, NUM_STATS] contiguous."""
    rows, vocab = s.shape
    if rows == 0:
        return
    block_v, num_warps = launch_config(vocab, s.is_cuda)
    divergence_rows_kernel[(rows,)](
        s, s.stride(0), t, t.stride(0), labels if labels is not None else coef, coef, stats,
        vocab, opts.ignore_index, opts.beta,
        opts.inv_tau_s, opts.inv_tau_t,
        opts.clip if opts.clip is not None else 0.0,
        opts.softcap if opts.softcap is not None else 1.0,
        KIND=KIND_CODES[opts.kind], HAS_LABELS=labels is not None, HAS_CLIP=opts.clip is not None,
        HAS_SOFTCAP=opts.softcap is not None, WRITE_GRAD=write_grad, NUM_STATS=stats.shape[1],
        BLOCK_V=block_v, num_warps=num_warps,
    )
