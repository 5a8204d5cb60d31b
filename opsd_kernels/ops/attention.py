"""Triton kernels for shared-prefix attention, and their launchers.

Layout and masks as in `opsd_kernels.reference.attention`. GQA by index: kv head h serves query
heads h * rep .. h * rep + rep - 1; K/V are never repeated. Every kernel accumulates in fp32 and
works in the log2 domain (qk_scale2 = scale * log2 e); lse is stored in natural log.

Forward (two launches):
1. `_fwd_prefix_kernel`, Hydragen: the queries of all rows of a group, of all query heads of a
   kv head, are stacked (index s = row_in_group * rep * R + head_in_group * R + position) and
   tiled in blocks of BLOCK_M; each block streams its group's one prefix copy. Blocks never
   straddle groups: a device-side table (`_group_tables`) maps program -> (group, block), sized
   by a static upper bound, so no group size is read on the host. Writes (o_P, lse_P) in fp32.
2. `_fwd_suffix_kernel`: causal attention within each row, starting the online softmax (running
   max m, running sum z = sum_j e^{s_j - m}, acc = sum_j e^{s_j - m} v_j) from the prefix
   state instead of from empty: over the prefix keys, m = lse_P gives z = 1 and acc = o_P
   exactly. Continuing over the suffix keys then performs the merge
   lse = logaddexp(lse_P, lse_S), o = e^{lse_P - lse} o_P + e^{lse_S - lse} o_S for free.

Backward (flash-attention 2 per part, both parts using the merged lse and output):
    p_ij = exp(s_ij - lse_i), Delta_i = dO_i . O_i, dS_ij = p_ij (dO_i . V_j - Delta_i),
    dV_j = sum_i p_ij dO_i, dQ_i = scale sum_j dS_ij K_j, dK_j = scale sum_i dS_ij Q_i.
1. `_bwd_dq_kernel`: one program per (query block, query head, row) over prefix and suffix keys;
   it also writes Delta for the next two.
2. `_bwd_suffix_dkdv_kernel`: one program per (suffix key block, kv head, row), looping over the
   rep query heads and the query blocks at or after the key block.
3. `_bwd_prefix_dkdv_kernel`: one program per (prefix key block, kv head, group), looping over
   the group's stacked queries (all its rows): dK_P / dV_P are summed in registers, so the
   result is deterministic and no atomics are needed.
Padded queries (r >= suffix_lengths[b]) get out = 0, lse = 0, dQ = 0 and contribute nothing;
padded keys are masked with -inf before the softmax and get dK = dV = 0. Lengths are read
clamped to R and P: the op refuses longer ones on the host, but not while torch.compile traces
(the check would read the device), and a longer one would read past its tensor.

Offsets: every index that multiplies a stride (rows, heads, positions, head dims) is int64.
Triton passes a stride below 2^31 as int32, and int32 products wrap silently on a GPU (and
under the interpreter); one row of a [B, R, H, D] view of a [B, R, H * D] projection already
spans R * H * D elements, more than 2^31 at R = 256k, H * D = 8192.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from opsd_kernels._backend import triton_interpreted

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# A finite floor for running maxima: exp2(-inf - floor) = 0 where exp2(-inf - -inf) is NaN.
_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)

MAX_HEAD_DIM = 256
# The launchers put suffix rows and prefix groups on grid dimension z (y holds heads), which
# CUDA caps at 65535; the interpreter runs any grid, so only a GPU launch would fail.
MAX_GRID_ROWS = 65535


# PRECISION "upcast" marks a run under the Triton 3.9 interpreter, whose bfloat16 support has
# two defects that these helpers work around: tl.dot multiplies the raw bits of bfloat16
# operands, and fp32 -> bfloat16 conversion truncates instead of rounding to nearest even.


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. "upcast": both operands converted to fp32 first; products
    of 16-bit operands are exact in fp32, so this matches a tensor-core dot up to summation
    order."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU conversion does."""
    if PRECISION == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)  # exactly representable in bfloat16 now
    return x.to(dtype)


@triton.jit
def _span(start, BLOCK: tl.constexpr):
    """start + [0, BLOCK) in int64, for indices that multiply strides. Not left to promotion:
    a loop counter over an int64 bound is int64 in a GPU build but a Python int (so int32) in
    the interpreter."""
    return start + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _stacked_lanes(s, n_stack, perm_ptr, row0, sl_ptr, rep_r, R):
    """Stacked query index s of a group -> (row b, head in group, position r, valid)."""
    in_group = s < n_stack
    j = s // rep_r
    t = s % rep_r
    b = tl.load(perm_ptr + row0 + j, mask=in_group, other=0)
    slen = tl.minimum(tl.load(sl_ptr + b, mask=in_group, other=0), R)
    r = t % R
    return b, (t // R).to(tl.int64), r.to(tl.int64), in_group & (r < slen)


@triton.jit
def _online_step(q, k_ptrs, v_ptrs, kv_mask, allowed, m, z, acc, qk_scale2,
                 PRECISION: tl.constexpr):
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale2
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    z = z * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, PRECISION), v, PRECISION)
    return m_new, z, acc


@triton.jit
def _fwd_prefix_kernel(
    Q, PK, PV, OP, LSEP,
    block_group_ptr, blk_start_ptr, perm_ptr, row_start_ptr, count_ptr, pl_ptr, sl_ptr,
    sqb, sqh, sqr, sqd, skg, skh, skn, skd, svg, svh, svn, svd,
    G, HQ, R, P, D, REP, qk_scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    g = tl.load(block_group_ptr + pid)
    live = g < G  # spare programs of the static grid do nothing
    g = tl.minimum(g, G - 1).to(tl.int64)
    rep_r = REP * R
    n_stack = tl.where(live, tl.load(count_ptr + g) * rep_r, 0)
    s = (pid - tl.load(blk_start_ptr + g)) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, hr, r, valid = _stacked_lanes(s, n_stack, perm_ptr, tl.load(row_start_ptr + g), sl_ptr,
                                     rep_r, R)
    d = _span(0, BLOCK_D)
    d_ok = d < D
    head = h * REP + hr
    q = tl.load(Q + (b * sqb + head * sqh + r * sqr)[:, None] + d[None, :] * sqd,
                mask=valid[:, None] & d_ok[None, :], other=0.0)

    plen = tl.where(live, tl.minimum(tl.load(pl_ptr + g), P), 0)
    k_base = PK + g * skg + h * skh
    v_base = PV + g * svg + h * svh
    m = tl.zeros([BLOCK_M], tl.float32) + _FLOOR
    z = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, plen, BLOCK_N):
        n = _span(n0, BLOCK_N)
        n_ok = n < plen
        m, z, acc = _online_step(
            q, k_base + n[:, None] * skn + d[None, :] * skd,
            v_base + n[:, None] * svn + d[None, :] * svd, n_ok[:, None] & d_ok[None, :],
            n_ok[None, :], m, z, acc, qk_scale2, PRECISION)
    # Every prefix has length >= 1, so z >= 1 on valid lanes.
    z_safe = tl.where(valid, z, 1.0)
    row = (b * HQ + head) * R + r
    tl.store(OP + row[:, None] * D + d[None, :], acc / z_safe[:, None],
             mask=valid[:, None] & d_ok[None, :])
    tl.store(LSEP + row, (m + tl.log2(z_safe)) * LN2, mask=valid)


@triton.jit
def _fwd_suffix_kernel(
    Q, K, V, OP, LSEP, OUT, LSE, sl_ptr,
    sqb, sqh, sqr, sqd, skb, skh, skr, skd, svb, svh, svr, svd,
    HQ, R, D, REP, qk_scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m_blk = tl.program_id(0)
    hq = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h = hq // REP
    slen = tl.minimum(tl.load(sl_ptr + b), R)
    r = _span(m_blk * BLOCK_M, BLOCK_M)
    valid = r < slen
    d = _span(0, BLOCK_D)
    d_ok = d < D
    vd = valid[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + hq * sqh + r[:, None] * sqr + d[None, :] * sqd, mask=vd, other=0.0)
    row = (b * HQ + hq) * R + r
    # The prefix state: m = lse_P (log2 domain), z = 1, acc = o_P.
    acc = tl.load(OP + row[:, None] * D + d[None, :], mask=vd, other=0.0)
    m = tl.load(LSEP + row, mask=valid, other=0.0) * LOG2E
    z = tl.zeros([BLOCK_M], tl.float32) + 1.0

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    hi = tl.minimum((m_blk + 1) * BLOCK_M, slen)
    for n0 in range(0, hi, BLOCK_N):
        n = _span(n0, BLOCK_N)
        n_ok = n < slen
        m, z, acc = _online_step(
            q, k_base + n[:, None] * skr + d[None, :] * skd,
            v_base + n[:, None] * svr + d[None, :] * svd, n_ok[:, None] & d_ok[None, :],
            (n[None, :] <= r[:, None]) & n_ok[None, :], m, z, acc, qk_scale2, PRECISION)
    out = tl.where(vd, acc / z[:, None], 0.0)
    in_r = r < R
    tl.store(OUT + row[:, None] * D + d[None, :], _cast(out, OUT.dtype.element_ty, PRECISION),
             mask=in_r[:, None] & d_ok[None, :])
    tl.store(LSE + row, tl.where(valid, (m + tl.log2(z)) * LN2, 0.0), mask=in_r)


@triton.jit
def _dq_step(q, do, lse2, delta, k_ptrs, v_ptrs, kv_mask, allowed, dq, qk_scale2,
             PRECISION: tl.constexpr):
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale2
    p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + _dot(_cast(ds, k.dtype, PRECISION), k, PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, OUT, DO, LSE, DELTA, DQ, gi_ptr, pl_ptr, sl_ptr,
    sqb, sqh, sqr, sqd, skb, skh, skr, skd, svb, svh, svr, svd,
    spkg, spkh, spkn, spkd, spvg, spvh, spvn, spvd,
    HQ, R, P, D, REP, qk_scale2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m_blk = tl.program_id(0)
    hq = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h = hq // REP
    g = tl.load(gi_ptr + b)
    plen = tl.minimum(tl.load(pl_ptr + g), P)
    slen = tl.minimum(tl.load(sl_ptr + b), R)
    r = _span(m_blk * BLOCK_M, BLOCK_M)
    valid = r < slen
    d = _span(0, BLOCK_D)
    d_ok = d < D
    vd = valid[:, None] & d_ok[None, :]
    row = (b * HQ + hq) * R + r
    q = tl.load(Q + b * sqb + hq * sqh + r[:, None] * sqr + d[None, :] * sqd, mask=vd, other=0.0)
    # O, dO and dQ are contiguous [B, Hq, R, D] (the launcher guarantees it).
    do = tl.load(DO + row[:, None] * D + d[None, :], mask=vd, other=0.0)
    o = tl.load(OUT + row[:, None] * D + d[None, :], mask=vd, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    in_r = r < R
    tl.store(DELTA + row, delta, mask=in_r)
    lse2 = tl.load(LSE + row, mask=valid, other=0.0) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pk_base = PK + g * spkg + h * spkh
    pv_base = PV + g * spvg + h * spvh
    for n0 in range(0, plen, BLOCK_N):
        n = _span(n0, BLOCK_N)
        n_ok = n < plen
        dq = _dq_step(q, do, lse2, delta, pk_base + n[:, None] * spkn + d[None, :] * spkd,
                      pv_base + n[:, None] * spvn + d[None, :] * spvd,
                      n_ok[:, None] & d_ok[None, :], valid[:, None] & n_ok[None, :], dq,
                      qk_scale2, PRECISION)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    hi = tl.minimum((m_blk + 1) * BLOCK_M, slen)
    for n0 in range(0, hi, BLOCK_N):
        n = _span(n0, BLOCK_N)
        n_ok = n < slen
        dq = _dq_step(q, do, lse2, delta, k_base + n[:, None] * skr + d[None, :] * skd,
                      v_base + n[:, None] * svr + d[None, :] * svd,
                      n_ok[:, None] & d_ok[None, :],
                      valid[:, None] & n_ok[None, :] & (n[None, :] <= r[:, None]), dq,
                      qk_scale2, PRECISION)
    tl.store(DQ + row[:, None] * D + d[None, :], _cast(dq * scale, DQ.dtype.element_ty, PRECISION),
             mask=in_r[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_step(k, v, q, do, lse2, delta, allowed, dk, dv, qk_scale2, PRECISION: tl.constexpr):
    """One query tile against a key tile, transposed ([keys, queries]) so that dK and dV
    accumulate without transposing the accumulators."""
    s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale2
    p_t = tl.where(allowed, tl.exp2(s_t - lse2[None, :]), 0.0)
    dv += _dot(_cast(p_t, do.dtype, PRECISION), do, PRECISION)
    dp_t = _dot(v, tl.trans(do), PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(_cast(ds_t, q.dtype, PRECISION), q, PRECISION)
    return dk, dv


@triton.jit
def _key_tile(K, V, k_base, v_base, n, n_ok, skn, skd, svn, svd, d, d_ok):
    """Keys and values n (int64 positions) of one kv head; 0 on masked lanes."""
    mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_base + n[:, None] * skn + d[None, :] * skd, mask=mask, other=0.0)
    v = tl.load(V + v_base + n[:, None] * svn + d[None, :] * svd, mask=mask, other=0.0)
    return k, v


@triton.jit
def _query_tile(Q, q_rows, sqd, DO, LSE, DELTA, row, valid, d, d_ok, D):
    """Queries (q_rows: each one's offset in Q), their dO, lse (log2 domain) and Delta; row
    indexes the contiguous [B, Hq, R] buffers."""
    vd = valid[:, None] & d_ok[None, :]
    q = tl.load(Q + q_rows[:, None] + d[None, :] * sqd, mask=vd, other=0.0)
    do = tl.load(DO + row[:, None] * D + d[None, :], mask=vd, other=0.0)
    lse2 = tl.load(LSE + row, mask=valid, other=0.0) * LOG2E
    delta = tl.load(DELTA + row, mask=valid, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _store_key_grads(DK, DV, key_row, in_bounds, d, d_ok, D, dk, dv, scale,
                     PRECISION: tl.constexpr):
    """dK (scaled) and dV of a key tile into contiguous outputs; key_row indexes their rows."""
    out = key_row[:, None] * D + d[None, :]
    mask = in_bounds[:, None] & d_ok[None, :]
    tl.store(DK + out, _cast(dk * scale, DK.dtype.element_ty, PRECISION), mask=mask)
    tl.store(DV + out, _cast(dv, DV.dtype.element_ty, PRECISION), mask=mask)


@triton.jit
def _bwd_suffix_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sl_ptr,
    sqb, sqh, sqr, sqd, skb, skh, skr, skd, svb, svh, svr, svd,
    HQ, HKV, R, D, REP, qk_scale2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n_blk = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    slen = tl.minimum(tl.load(sl_ptr + b), R)
    n = _span(n_blk * BLOCK_N, BLOCK_N)
    n_ok = n < slen
    d = _span(0, BLOCK_D)
    d_ok = d < D
    k, v = _key_tile(K, V, b * skb + h * skh, b * svb + h * svh, n, n_ok, skr, skd, svr, svd, d,
                     d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Causal: only queries r >= the first key of the block see it.
    lo = (n_blk * BLOCK_N // BLOCK_M) * BLOCK_M
    hi = tl.where(n_blk * BLOCK_N < slen, slen, lo)
    for hr in range(0, REP):
        hq = h * REP + hr
        for m0 in range(lo, hi, BLOCK_M):
            r = _span(m0, BLOCK_M)
            valid = r < slen
            row = (b * HQ + hq) * R + r
            q, do, lse2, delta = _query_tile(Q, b * sqb + hq * sqh + r * sqr, sqd, DO, LSE, DELTA,
                                             row, valid, d, d_ok, D)
            allowed = n_ok[:, None] & valid[None, :] & (n[:, None] <= r[None, :])
            dk, dv = _dkdv_step(k, v, q, do, lse2, delta, allowed, dk, dv, qk_scale2, PRECISION)
    _store_key_grads(DK, DV, (b * HKV + h) * R + n, n < R, d, d_ok, D, dk, dv, scale, PRECISION)


@triton.jit
def _bwd_prefix_dkdv_kernel(
    Q, PK, PV, DO, LSE, DELTA, DPK, DPV, perm_ptr, row_start_ptr, count_ptr, pl_ptr, sl_ptr,
    sqb, sqh, sqr, sqd, spkg, spkh, spkn, spkd, spvg, spvh, spvn, spvd,
    HQ, HKV, R, P, D, REP, qk_scale2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n_blk = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    plen = tl.minimum(tl.load(pl_ptr + g), P)
    n = _span(n_blk * BLOCK_N, BLOCK_N)
    n_ok = n < plen
    d = _span(0, BLOCK_D)
    d_ok = d < D
    k, v = _key_tile(PK, PV, g * spkg + h * spkh, g * spvg + h * spvh, n, n_ok, spkn, spkd, spvn,
                     spvd, d, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    rep_r = REP * R
    # A key block past the prefix end (or a group without rows) loops zero times.
    n_stack = tl.where(n_blk * BLOCK_N < plen, tl.load(count_ptr + g) * rep_r, 0)
    row0 = tl.load(row_start_ptr + g)
    for s0 in range(0, n_stack, BLOCK_M):
        b, hr, r, valid = _stacked_lanes(s0 + tl.arange(0, BLOCK_M), n_stack, perm_ptr, row0,
                                         sl_ptr, rep_r, R)
        head = h * REP + hr
        row = (b * HQ + head) * R + r
        q, do, lse2, delta = _query_tile(Q, b * sqb + head * sqh + r * sqr, sqd, DO, LSE, DELTA,
                                         row, valid, d, d_ok, D)
        dk, dv = _dkdv_step(k, v, q, do, lse2, delta, n_ok[:, None] & valid[None, :], dk, dv,
                            qk_scale2, PRECISION)
    _store_key_grads(DPK, DPV, (g * HKV + h) * P + n, n < P, d, d_ok, D, dk, dv, scale,
                     PRECISION)


# --- launchers ------------------------------------------------------------------------------------


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes: tiny under the interpreter (it runs numpy per program), FA2-like on a GPU
    (fp32 tiles take twice the shared memory of 16-bit ones)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32: unused by 16-bit dots
    if device.type != "cuda" or triton_interpreted():
        return dict(fwd=(16, 16), bwd=(16, 16), block_d=block_d, warps=4, stages=1,
                    precision="upcast")
    small = block_d > 128 or dtype == torch.float32
    return dict(fwd=(64, 32) if small else (128, 64), bwd=(32, 32) if small else (64, 64),
                block_d=block_d, warps=4 if small else 8, stages=2 if small else 3,
                precision=precision)


def _group_tables(group_index: torch.Tensor, groups: int, rep_r: int, block_m: int
                  ) -> tuple[torch.Tensor, ...]:
    """Device-side row lists of every group and the (group, block) of every stacked-query
    program of `_fwd_prefix_kernel`; sync-free (the grid is a static upper bound).

    Returns perm (rows sorted by group), row_start, count (per group), blk_start (first
    program of each group) and block_group (group of each program; `groups` for spares)."""
    b = group_index.shape[0]
    # Not torch.bincount: on CUDA it reads the largest index on the host to size its output.
    count = torch.zeros(groups, dtype=torch.int64, device=group_index.device)
    count.scatter_add_(0, group_index, torch.ones_like(group_index))
    perm = torch.argsort(group_index, stable=True)
    row_start = torch.cumsum(count, 0) - count
    blocks = (count * rep_r + block_m - 1) // block_m
    blk_end = torch.cumsum(blocks, 0)
    # sum_g ceil(c_g rep_r / M) <= ceil(B rep_r / M) + (number of non-empty groups - 1).
    n_programs = triton.cdiv(b * rep_r, block_m) + min(groups, b)
    pids = torch.arange(n_programs, device=group_index.device)
    block_group = torch.searchsorted(blk_end, pids, right=True)
    return perm, row_start, count, blk_end - blocks, block_group


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


@dataclass(frozen=True)
class _Launch:
    """What every launch of one pass shares: the shapes, the tile sizes and the keyword
    arguments (block sizes, precision, warps, stages) of its kernels."""

    b: int
    hq: int
    hkv: int
    r: int
    p: int
    d: int
    g: int
    rep: int
    block_m: int
    block_n: int
    qk_scale2: float  # scale * log2 e
    meta: dict


def _launch(q: torch.Tensor, pk: torch.Tensor, scale: float, phase: str) -> _Launch:
    """Shapes and the configuration of the "fwd" or "bwd" phase for these inputs."""
    b, hq, r, d = q.shape
    g, hkv, p = pk.shape[0], pk.shape[1], pk.shape[2]
    cfg = _config(d, q.dtype, q.device)
    bm, bn = cfg[phase]
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["block_d"], PRECISION=cfg["precision"],
                num_warps=cfg["warps"], num_stages=cfg["stages"])
    return _Launch(b, hq, hkv, r, p, d, g, hq // hkv, bm, bn, scale * 1.4426950408889634, meta)


def shared_prefix_attention_fwd_triton_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
    group_index: torch.Tensor, prefix_lengths: torch.Tensor, suffix_lengths: torch.Tensor,
    scale: float, out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Write out [B, Hq, R, D] (contiguous, input dtype) and lse [B, Hq, R] (contiguous fp32).
    Inputs: any strides; group_index / lengths int64 on the same device."""
    if q.shape[0] == 0:
        return
    c = _launch(q, pk, scale, "fwd")
    o_p = torch.empty((c.b, c.hq, c.r, c.d), dtype=torch.float32, device=q.device)
    lse_p = torch.empty((c.b, c.hq, c.r), dtype=torch.float32, device=q.device)
    perm, row_start, count, blk_start, block_group = _group_tables(group_index, c.g,
                                                                   c.rep * c.r, c.block_m)
    _fwd_prefix_kernel[(block_group.shape[0], c.hkv)](
        q, pk, pv, o_p, lse_p, block_group, blk_start, perm, row_start, count, prefix_lengths,
        suffix_lengths, *_strides(q, pk, pv), c.g, c.hq, c.r, c.p, c.d, c.rep, c.qk_scale2,
        **c.meta)
    _fwd_suffix_kernel[(triton.cdiv(c.r, c.block_m), c.hq, c.b)](
        q, k, v, o_p, lse_p, out, lse, suffix_lengths, *_strides(q, k, v), c.hq, c.r, c.d, c.rep,
        c.qk_scale2, **c.meta)


def shared_prefix_attention_bwd_triton_(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    pk: torch.Tensor, pv: torch.Tensor, group_index: torch.Tensor,
    prefix_lengths: torch.Tensor, suffix_lengths: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    dpk: torch.Tensor | None, dpv: torch.Tensor | None,
) -> None:
    """Write dq, dk, dv and (when given) dpk, dpv, all contiguous in the input dtype.
    grad_out, out [B, Hq, R, D] and lse [B, Hq, R] contiguous; q, k, v, pk, pv any strides."""
    if q.shape[0] == 0:
        if dpk is not None:
            dpk.zero_()
            dpv.zero_()
        return
    c = _launch(q, pk, scale, "bwd")
    delta = torch.empty((c.b, c.hq, c.r), dtype=torch.float32, device=q.device)
    _bwd_dq_kernel[(triton.cdiv(c.r, c.block_m), c.hq, c.b)](
        q, k, v, pk, pv, out, grad_out, lse, delta, dq, group_index, prefix_lengths,
        suffix_lengths, *_strides(q, k, v, pk, pv), c.hq, c.r, c.p, c.d, c.rep, c.qk_scale2,
        scale, **c.meta)
    _bwd_suffix_dkdv_kernel[(triton.cdiv(c.r, c.block_n), c.hkv, c.b)](
        q, k, v, grad_out, lse, delta, dk, dv, suffix_lengths, *_strides(q, k, v), c.hq, c.hkv,
        c.r, c.d, c.rep, c.qk_scale2, scale, **c.meta)
    if dpk is None:
        return
    perm, row_start, count, _, _ = _group_tables(group_index, c.g, c.rep * c.r, c.block_m)
    _bwd_prefix_dkdv_kernel[(triton.cdiv(c.p, c.block_n), c.hkv, c.g)](
        q, pk, pv, grad_out, lse, delta, dpk, dpv, perm, row_start, count, prefix_lengths,
        suffix_lengths, *_strides(q, pk, pv), c.hq, c.hkv, c.r, c.p, c.d, c.rep, c.qk_scale2,
        scale, **c.meta)
