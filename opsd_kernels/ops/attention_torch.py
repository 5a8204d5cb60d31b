"""The PyTorch backend of shared-prefix attention: two-part attention (prefix, causal suffix)
merged by log-sum-exp, in two forms with the same contract as the Triton launchers.

- The masked form (`prefix_attention_parts`, `prefix_attention_backward`), which the backend
  runs off CPU, works over chunks of rows sized from a workspace budget (`WORKSPACE_BYTES`, as
  the loss's chunked driver does), so its peak is bounded by the budget, not by the batch. Each
  chunk gathers the prefix K/V of its own rows only; a row's prefix copy (Hkv P D) is small next
  to its scores (Hq R P), which any PyTorch form materialises. Stacking all rows of a group
  against a single prefix copy, as the Triton kernels do, would need each group's row count on
  the host (a device sync) to shape the matmuls. The masked form is sync-free: lengths and group
  ids stay tensors and only enter masks and index ops; it serves any device, and is
  differentiable by autograd.
- The fused form (`fused_prefix_attention`, `fused_prefix_attention_backward`), which the
  backend runs on CPU, where reading group ids and lengths on the host costs no sync. Per group,
  its rows attend to one copy of the group's prefix cut to its real length and seen once per
  row through a stride-0 expand (no copy, no mask, no padded prefix key; the kernel reads it
  from cache for every row, as Hydragen's stacked queries would), with torch's fused CPU
  attention kernels (flash-attention style tiles, fp32 statistics). The suffix part is one
  causal call over all rows; a valid query never sees a padded suffix key. The merge writes the
  contiguous output in one pass per part, with weights that are 0 on padded queries (their part
  outputs are finite for finite inputs). The backward gets dK_P / dV_P per row and sums them
  over the group's rows (a fixed-order reduction: deterministic); padded queries enter it with
  dO = 0 and lse = +inf (p = 0), so they give no gradient anywhere. Few passes over the
  activations matter on a CPU shared with other jobs: each one is a parallel region, and every
  region waits for a descheduled thread.

`shared_prefix_attention_fwd_torch` / `shared_prefix_attention_bwd_torch` pick the form by
device (`runs_fused_form`); layout and masks as in `opsd_kernels.reference.attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opsd_kernels.reference.attention import math_dtype, with_defaults

# --- masked form (any device) ---------------------------------------------------------------


# Workspace of one chunk of rows (its scores and their temporaries), as in
# `divergence_driver.py`. On a CPU small chunks are faster too (they stay in cache): at G=2,
# n=4, P=512, R=128, Hq=4, D=64,
# one row per chunk ran forward + backward in 0.6x the time of all eight rows at once.
WORKSPACE_BYTES = {"cuda": 512 * 2**20, "cpu": 16 * 2**20}
_TEMPORARIES = 8  # fp32 [rows, Hq, R, P + R]-sized buffers alive at once (measured peak)


def chunk_rows(query: Tensor, p: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: the caller's choice, else as many as fit the default workspace."""
    b, hq, r, _ = query.shape
    if chunk_size is not None:
        return max(1, min(chunk_size, b))
    per_row = _TEMPORARIES * 4 * hq * r * (p + r)
    budget = WORKSPACE_BYTES["cuda" if query.device.type == "cuda" else "cpu"]
    return max(1, min(b, budget // per_row))


def _no_rows(query: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of a batch without rows."""
    return query.new_zeros(query.shape), query.new_zeros(
        (0, *query.shape[1:3]), dtype=math_dtype(query.dtype))


def _scores(q: Tensor, keys: Tensor, scale: float, allowed: Tensor) -> Tensor:
    """Masked scaled scores of a chunk against one part: [rows, Hkv, rep * R, keys]."""
    s = (q @ keys.transpose(-1, -2)) * scale
    return s.masked_fill(~allowed, float("-inf"))


class _Chunk:
    """Rows [i0, i1) in the stacked GQA layout [rows, Hkv, rep * R, D] (t = head_in_group * R
    + position), their group ids, their groups' prefix K/V and the masks."""

    def __init__(self, i0: int, i1: int, query: Tensor, key: Tensor, value: Tensor,
                 prefix_key: Tensor, prefix_value: Tensor, group_index: Tensor,
                 prefix_lengths: Tensor, suffix_lengths: Tensor, acc: torch.dtype) -> None:
        c, (_, hq, r, d) = i1 - i0, query.shape
        hkv, p = prefix_key.shape[1], prefix_key.shape[2]
        device = query.device
        self.shape = (c, hq, r, d)
        self.stacked = (c, hkv, hq // hkv * r, d)
        self.groups = group_index[i0:i1]
        self.q = query[i0:i1].to(acc).reshape(self.stacked)
        self.k, self.v = key[i0:i1].to(acc), value[i0:i1].to(acc)
        # Only this chunk's rows get a copy of their prefix (bounded by the workspace).
        self.pk = prefix_key.index_select(0, self.groups).to(acc)
        self.pv = prefix_value.index_select(0, self.groups).to(acc)
        pos = torch.arange(self.stacked[2], device=device) % r
        plen = prefix_lengths.index_select(0, self.groups)
        self.prefix_ok = (torch.arange(p, device=device) < plen[:, None])[:, None, None, :]
        self.causal = torch.arange(r, device=device)[None, :] <= pos[:, None]
        self.valid = (pos < suffix_lengths[i0:i1, None])[:, None, :, None]  # [c, 1, rep R, 1]


def _chunks(query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
            group_index: Tensor, prefix_lengths: Tensor, suffix_lengths: Tensor,
            chunk_size: int | None):
    b, acc = query.shape[0], math_dtype(query.dtype)
    step = chunk_rows(query, prefix_key.shape[2], chunk_size)
    for i0 in range(0, b, step):
        yield i0, _Chunk(i0, min(b, i0 + step), query, key, value, prefix_key, prefix_value,
                         group_index, prefix_lengths, suffix_lengths, acc)


def prefix_attention_parts(
    query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
    group_index: Tensor, prefix_lengths: Tensor | None = None,
    suffix_lengths: Tensor | None = None, *, scale: float | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Two-part attention with the log-sum-exp merge, a chunk of rows at a time; (out, lse).

    out in the input dtype, lse in the math dtype (fp32, or fp64 for fp64 inputs); both 0 on
    padded queries. Differentiable by autograd. chunk_size: rows per chunk (default: from
    `WORKSPACE_BYTES`).
    """
    if query.shape[0] == 0:
        return _no_rows(query)
    prefix_lengths, suffix_lengths, scale = with_defaults(query, prefix_key, prefix_lengths,
                                                          suffix_lengths, scale)
    outs, lses = [], []
    for _, c in _chunks(query, key, value, prefix_key, prefix_value, group_index,
                        prefix_lengths, suffix_lengths, chunk_size):
        s_p = _scores(c.q, c.pk, scale, c.prefix_ok)
        s_s = _scores(c.q, c.k, scale, c.causal)
        lse_p, lse_s = s_p.logsumexp(-1, keepdim=True), s_s.logsumexp(-1, keepdim=True)
        lse = torch.logaddexp(lse_p, lse_s)
        o = (lse_p - lse).exp() * (s_p.softmax(-1) @ c.pv)
        o = o + (lse_s - lse).exp() * (s_s.softmax(-1) @ c.v)
        outs.append(torch.where(c.valid, o, 0.0).reshape(c.shape))
        lses.append(torch.where(c.valid, lse, 0.0).reshape(c.shape[:3]))
    return torch.cat(outs).to(query.dtype), torch.cat(lses)


def _add_rows_to_groups(total: Tensor, groups: Tensor, rows: Tensor) -> None:
    """total[groups[i]] += rows[i], one row at a time in row order. A single index_add_ would
    sum the rows of a group with atomics on CUDA (a different rounding on every run); one row
    per add never races, costs the same memory traffic, and stays sync-free."""
    for i in range(rows.shape[0]):
        total.index_add_(0, groups[i:i + 1], rows[i:i + 1])


def prefix_attention_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor,
    prefix_value: Tensor, group_index: Tensor, prefix_lengths: Tensor, suffix_lengths: Tensor,
    out: Tensor, lse: Tensor, scale: float, prefix_grad: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Analytic gradients (dq, dk, dv, dprefix_k, dprefix_v) of `prefix_attention_parts`.

    With p_ij = exp(s_ij - lse_i) over both parts (lse the merged one), Delta_i = dO_i . O_i:
    dV_j = sum_i p_ij dO_i, dS_ij = p_ij (dO_i . V_j - Delta_i), dQ_i = scale sum_j dS_ij K_j,
    dK_j = scale sum_i dS_ij Q_i; prefix dK / dV summed over every row of the group.
    Gradients in the input dtype; prefix ones None unless prefix_grad.
    """
    g_count, hkv, p, d = prefix_key.shape
    acc = math_dtype(query.dtype)
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    dpk = query.new_zeros((g_count, hkv, p, d), dtype=acc) if prefix_grad else None
    dpv = query.new_zeros((g_count, hkv, p, d), dtype=acc) if prefix_grad else None
    for i0, c in _chunks(query, key, value, prefix_key, prefix_value, group_index,
                         prefix_lengths, suffix_lengths, chunk_size):
        rows = slice(i0, i0 + c.shape[0])
        do = torch.where(c.valid, grad_out[rows].to(acc).reshape(c.stacked), 0.0)
        delta = torch.linalg.vecdot(do, out[rows].to(acc).reshape(c.stacked))[..., None]
        lse_c = lse[rows].to(acc).reshape(c.stacked[:3])[..., None]
        dq_c = torch.zeros_like(c.q)
        for keys, vals, allowed, is_prefix in ((c.pk, c.pv, c.prefix_ok, True),
                                               (c.k, c.v, c.causal, False)):
            # where, not a product: a padded query's lse is 0, so its exp may overflow.
            probs = torch.where(c.valid, (_scores(c.q, keys, scale, allowed) - lse_c).exp(), 0.0)
            ds = probs * (do @ vals.transpose(-1, -2) - delta)
            dq_c += ds @ keys
            grad_k = (ds.transpose(-1, -2) @ c.q) * scale
            grad_v = probs.transpose(-1, -2) @ do
            if not is_prefix:
                dk[rows], dv[rows] = grad_k, grad_v
            elif prefix_grad:
                _add_rows_to_groups(dpk, c.groups, grad_k)
                _add_rows_to_groups(dpv, c.groups, grad_v)
        dq[rows] = (dq_c * scale).reshape(c.shape)
    if dpk is not None:
        dpk, dpv = dpk.to(query.dtype), dpv.to(query.dtype)
    return dq, dk, dv, dpk, dpv


# --- fused form (CPU) -----------------------------------------------------------------------------

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _group_rows(group_index: Tensor, prefix_lengths: Tensor
                ) -> list[tuple[int, int, slice | Tensor]]:
    """(group, its prefix length, its rows) of every group with rows, read on the host; rows
    is a slice when they are consecutive (no gather then)."""
    lengths = prefix_lengths.tolist()
    members: dict[int, list[int]] = {}
    for row, g in enumerate(group_index.tolist()):
        members.setdefault(g, []).append(row)
    out = []
    for g, rows in sorted(members.items()):
        first, n = rows[0], len(rows)
        consecutive = rows[-1] - first == n - 1
        out.append((g, lengths[g], slice(first, first + n) if consecutive
                    else torch.tensor(rows, device=group_index.device)))
    return out


def _count(rows: slice | Tensor) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]


def _prefix_rows(x: Tensor, g: int, length: int, n: int) -> Tensor:
    """Group g's prefix K or V cut to its real length, seen (not copied) by each of n rows."""
    return x[g:g + 1, :, :length].expand(n, -1, -1, -1)


def fused_prefix_attention(
    query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
    group_index: Tensor, prefix_lengths: Tensor | None = None,
    suffix_lengths: Tensor | None = None, *, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """`prefix_attention_parts` on torch's fused CPU attention kernels (CPU tensors only; reads
    group ids and prefix lengths on the host). (out in the input dtype, lse in the math dtype),
    both contiguous and 0 on padded queries. Not differentiable by autograd: the backward is
    `fused_prefix_attention_backward`."""
    if query.shape[0] == 0:
        return _no_rows(query)
    prefix_lengths, suffix_lengths, scale = with_defaults(query, prefix_key, prefix_lengths,
                                                          suffix_lengths, scale)
    b, hq, r, _ = query.shape
    acc = math_dtype(query.dtype)
    q, k, v, pk, pv = (x.to(acc) for x in (query, key, value, prefix_key, prefix_value))
    o_s, lse_s = _flash(q, k, v, 0.0, True, scale=scale)
    valid = (torch.arange(r, device=query.device) < suffix_lengths[:, None])[:, None, :]
    out = torch.empty(query.shape, dtype=acc, device=query.device)
    lse = torch.empty((b, hq, r), dtype=acc, device=query.device)
    for g, length, rows in _group_rows(group_index, prefix_lengths):
        n = _count(rows)
        o_p, lse_p = _flash(q[rows], _prefix_rows(pk, g, length, n),
                            _prefix_rows(pv, g, length, n), 0.0, False, scale=scale)
        ok, lse_rows = valid[rows], lse_s[rows]
        merged = torch.logaddexp(lse_p, lse_rows)
        w_p = torch.where(ok, (lse_p - merged).exp(), 0.0)[..., None]
        w_s = torch.where(ok, (lse_rows - merged).exp(), 0.0)[..., None]
        if isinstance(rows, slice):  # written in place: no gather, no scatter
            torch.mul(o_s[rows], w_s, out=out[rows]).addcmul_(o_p, w_p)
        else:
            out[rows] = torch.addcmul(o_s[rows] * w_s, o_p, w_p)
        lse[rows] = torch.where(ok, merged, 0.0)
    return out.to(query.dtype), lse


def fused_prefix_attention_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor,
    prefix_value: Tensor, group_index: Tensor, prefix_lengths: Tensor, suffix_lengths: Tensor,
    out: Tensor, lse: Tensor, scale: float, prefix_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of `fused_prefix_attention`, as
    `prefix_attention_backward` defines them: each part's fused backward with the merged out and
    lse (p_ij = exp(s_ij - lse_i), Delta_i = dO_i . O_i over both parts). dq sums the parts in
    the math dtype; dK_P / dV_P sum a group's rows. Gradients contiguous in the
    input dtype; prefix ones None unless prefix_grad."""
    b, _, r, _ = query.shape
    acc = math_dtype(query.dtype)
    # Every slot is written below: a group's summed rows, zeros past its length and for
    # groups without rows (no fill of the whole buffer first).
    dpk = torch.empty(prefix_key.shape, dtype=acc, device=query.device) if prefix_grad else None
    dpv = torch.empty(prefix_value.shape, dtype=acc, device=query.device) if prefix_grad else None
    seen: set[int] = set()
    if b == 0:
        dq, dk, dv = query.new_zeros(query.shape), key.new_zeros(key.shape), value.new_zeros(
            value.shape)
    else:
        q, k, v, pk, pv = (x.to(acc) for x in (query, key, value, prefix_key, prefix_value))
        valid = (torch.arange(r, device=query.device) < suffix_lengths[:, None])[:, None, :]
        # Padded queries: lse = +inf gives p = exp(s - lse) = 0 (their stored lse 0 could let
        # exp overflow, and inf * 0 is NaN). Their dO is zeroed too: it only meets zeros then,
        # but a non-finite one would still turn them into NaN.
        lse = torch.where(valid, lse.to(acc), float("inf"))
        do, o = torch.where(valid[..., None], grad_out.to(acc), 0.0), out.to(acc)
        dq_s, dk, dv = _flash_backward(do, q, k, v, o, lse, 0.0, True, scale=scale)
        dq = torch.empty(query.shape, dtype=acc, device=query.device)
        for g, length, rows in _group_rows(group_index, prefix_lengths):
            n = _count(rows)
            dq_p, dpk_rows, dpv_rows = _flash_backward(
                do[rows], q[rows], _prefix_rows(pk, g, length, n), _prefix_rows(pv, g, length, n),
                o[rows], lse[rows], 0.0, False, scale=scale)
            if isinstance(rows, slice):
                torch.add(dq_s[rows], dq_p, out=dq[rows])
            else:
                dq[rows] = dq_s[rows] + dq_p
            if prefix_grad:
                torch.sum(dpk_rows, 0, out=dpk[g, :, :length])
                torch.sum(dpv_rows, 0, out=dpv[g, :, :length])
                dpk[g, :, length:], dpv[g, :, length:] = 0.0, 0.0
                seen.add(g)
        dq, dk, dv = (x.to(query.dtype).contiguous() for x in (dq, dk, dv))
    if prefix_grad:
        for g in set(range(prefix_key.shape[0])) - seen:
            dpk[g], dpv[g] = 0.0, 0.0
    if dpk is not None:
        dpk, dpv = dpk.to(query.dtype), dpv.to(query.dtype)
    return dq, dk, dv, dpk, dpv


# --- the backend: one form per device ---------------------------------------------------------


def runs_fused_form(device: torch.device) -> bool:
    """The fused form on CPU; the masked one elsewhere (the fused form reads group ids on the
    host, which costs a sync on an accelerator)."""
    return device.type == "cpu"


def shared_prefix_attention_fwd_torch(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, group_index: Tensor,
    prefix_lengths: Tensor, suffix_lengths: Tensor, scale: float,
) -> tuple[Tensor, Tensor]:
    """(out in the input dtype, lse in the math dtype), both contiguous and 0 on padded
    queries; no autograd graph."""
    form = fused_prefix_attention if runs_fused_form(q.device) else prefix_attention_parts
    with torch.no_grad():
        out, lse = form(q, k, v, pk, pv, group_index, prefix_lengths, suffix_lengths,
                        scale=scale)
    return out.contiguous(), lse.contiguous()


def shared_prefix_attention_bwd_torch(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor,
    group_index: Tensor, prefix_lengths: Tensor, suffix_lengths: Tensor, out: Tensor,
    lse: Tensor, scale: float, prefix_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dq, dk, dv, dprefix_key, dprefix_value) in the input dtype; the prefix ones None unless
    prefix_grad."""
    form = (fused_prefix_attention_backward if runs_fused_form(q.device)
            else prefix_attention_backward)
    with torch.no_grad():
        return form(grad_out, q, k, v, pk, pv, group_index, prefix_lengths, suffix_lengths, out,
                    lse, scale, prefix_grad)
