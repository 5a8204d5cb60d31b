"""The chunked driver shared by every backend: logits for a block of rows, the row step, the
gradient GEMMs. Its workspace is O(chunk x V) and independent of the number of tokens.

The row step (Triton kernel, native kernel, PyTorch form) only ever sees full-vocabulary fp32
rows; top-k supports are handled here by gathering the kept logits, running the same row step on
them, and scattering the gradient back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opsd_kernels.reference.rows import divergence_rows_torch_
from opsd_kernels.row_options import RowOptions
from opsd_kernels.types import NUM_STATS

RowStep = Callable[..., None]

# Default workspace for one chunk (logits of both roles plus the row step's temporaries). On a
# GPU it must hold enough rows to keep the GEMMs efficient; on a CPU smaller chunks stay in
# cache and keep the peak low.
DEFAULT_WORKSPACE_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}
# fp32 [rows, V] buffers per row beyond the two logits blocks: the PyTorch row step keeps a few
# temporaries alive; the Triton and native kernels keep none (native: three rows per thread).
_EXTRA_ROW_BUFFERS = {"torch": 8, "triton": 0, "native": 0}
# On CPU the native chunk is sized as if it kept two: its peak then stays below the PyTorch
# step's at the same budget (whose 8 is a bound it does not reach), for ~10% more GEMM time
# than a full-budget chunk (every chunk re-reads the head; bench/bench_native.py).
_CPU_EXTRA_ROW_BUFFERS = {**_EXTRA_ROW_BUFFERS, "native": 2}


def extra_row_buffers(backend: str, device: torch.device) -> int:
    table = _EXTRA_ROW_BUFFERS if device.type == "cuda" else _CPU_EXTRA_ROW_BUFFERS
    return table.get(backend, 2)


@dataclass(frozen=True)
class TopK:
    k: int
    source: str
    tail_bucket: bool


def row_step_for(backend: str) -> RowStep:
    if backend == "triton":
        from opsd_kernels.ops.divergence import divergence_rows_triton_

        return divergence_rows_triton_
    if backend == "torch":
        return divergence_rows_torch_
    if backend == "native":
        from opsd_kernels._native import divergence_rows_native_

        return divergence_rows_native_
    raise ValueError(f"backend: no row step for {backend!r}")


def chunk_rows(
    n_rows: int, vocab: int, backend: str, chunk_size: int | None, device: torch.device
) -> int:
    """Rows per chunk: the caller's choice, else as many as fit the default workspace."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    budget = DEFAULT_WORKSPACE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    per_row = 4 * vocab * (2 + extra_row_buffers(backend, device))
    return max(1, min(n_rows, budget // per_row))


def run_row_step(
    step: RowStep,
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    stats: torch.Tensor,
    opts: RowOptions,
    write_grad: bool,
    top_k: TopK | None,
) -> None:
    """One block of rows: stats, and coef * d loss / d z_S written over `s` if write_grad."""
    if top_k is None:
        step(s, t, labels, coef, stats, opts, write_grad)
    else:
        _top_k_row_step(step, s, t, labels, coef, stats, opts, write_grad, top_k)


def _scale(z: torch.Tensor, inv_tau: float, softcap: float | None) -> torch.Tensor:
    return (z if softcap is None else softcap * torch.tanh(z / softcap)) * inv_tau


def _top_k_row_step(
    step: RowStep,
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    stats: torch.Tensor,
    opts: RowOptions,
    write_grad: bool,
    top_k: TopK,
) -> None:
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

    lse_s, lse_t = s_sc.logsumexp(-1), t_sc.logsumexp(-1)
    full = [lse_s, lse_t, torch.zeros_like(lse_s), torch.zeros_like(lse_t)]
    if labels is not None:
        valid = labels != opts.ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        full[2] = s_sc.gather(-1, safe).squeeze(-1) - lse_s
        full[3] = t_sc.gather(-1, safe).squeeze(-1) - lse_t
        full = [torch.where(valid, x, torch.zeros_like(x)) for x in full]
    stats[:, 3:7] = torch.stack(full, dim=-1)
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


def stats_buffer(n_rows: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n_rows, NUM_STATS, dtype=torch.float32, device=device)
