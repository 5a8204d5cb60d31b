"""The divergence ops' driver: one forward-and-backward sweep over chunks of rows, from hidden
states or from logits, shared by every backend. Its workspace is O(chunk x V), whatever N is.

Per chunk: fp32 logits of both roles (one GEMM on [h_S; h_T] when the head is shared), the row
step (Triton kernel, native kernel or PyTorch form, picked by `row_step_for`) writes
coef * d loss / d z_S over the student logits, then grad h_S = G W and, only when asked,
grad W += G^T h_S and grad b_S += sum_rows G. Gradients are finished here; the autograd
backward only scales them. Nothing synchronises with the host. Top-k supports wrap the same
row step (divergence_top_k.py). From logits, the row step gets fp32 copies of each chunk, but
for the native step, which reads bf16 logits as they are (and writes their bf16 gradient).
"""

from __future__ import annotations

import functools

import torch

from opsd_kernels.divergence_options import RowOptions, TopK
from opsd_kernels.divergence_top_k import RowStep, with_top_k
from opsd_kernels.ops.divergence_torch import divergence_rows_torch_
from opsd_kernels.types import NUM_STATS

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


def row_step_for(backend: str) -> RowStep:
    if backend == "triton":
        from opsd_kernels.ops.divergence import divergence_rows_triton_

        return divergence_rows_triton_
    if backend == "torch":
        return divergence_rows_torch_
    if backend == "native":
        from opsd_kernels.ops.divergence_native import divergence_rows_native_

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


def stats_buffer(n_rows: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n_rows, NUM_STATS, dtype=torch.float32, device=device)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    try:
        a = torch.zeros(1, 1, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _fp32_operand(w: torch.Tensor) -> torch.Tensor:
    """The weight as the GEMMs use it: as is, unless only an fp32 upcast gives fp32 logits."""
    if w.dtype == torch.float32 or (w.is_cuda and _cuda_mm_has_out_dtype()):
        return w
    return w.float()


def _logits_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) with an fp32 result; never a bf16 GEMM output rounded, then upcast.
    `out`: a workspace to write it into (fp32 weights only)."""
    if w.dtype == torch.float32:
        out = x.float() @ w.t() if out is None else torch.mm(x.float(), w.t(), out=out)
    else:
        out = torch.mm(x, w.t(), out_dtype=torch.float32)
    if bias is not None:
        out += bias.float()
    return out


def fused_linear_forward_backward(
    h_s: torch.Tensor,
    w: torch.Tensor,
    h_t: torch.Tensor,
    w_t: torch.Tensor | None,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    b_s: torch.Tensor | None,
    b_t: torch.Tensor | None,
    opts: RowOptions,
    top_k: TopK | None,
    backend: str,
    chunk_size: int | None,
    need_grad_h: bool,
    need_grad_w: bool,
    need_grad_bs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token stats [N, NUM_STATS] and the gradients of sum_i coef_i D_i that were asked for
    (fp32; the caller casts them to the inputs' dtypes)."""
    n, vocab = h_s.shape[0], w.shape[0]
    need_grad_bs = need_grad_bs and b_s is not None
    step = with_top_k(row_step_for(backend), top_k)
    stats = stats_buffer(n, h_s.device)
    write_grad = need_grad_h or need_grad_w or need_grad_bs
    # Gradients stay fp32 until backward has scaled them: an fp16 gradient stored unscaled
    # would underflow before a loss scale could rescue it.
    grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device) if need_grad_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_w else None
    grad_bs = torch.zeros(vocab, dtype=torch.float32, device=w.device) if need_grad_bs else None

    w_mm = _fp32_operand(w)
    shared = w_t is None
    w_t_mm = w_mm if shared else _fp32_operand(w_t)
    rows = chunk_rows(n, vocab, backend, chunk_size, h_s.device)
    # One logits workspace for every chunk: paged in once, and the peak holds one chunk's
    # logits, not two (a new chunk's would be allocated before the last one's are freed).
    ws = None
    if w_mm.dtype == torch.float32 and w_t_mm.dtype == torch.float32:
        ws = torch.empty(2 * rows, vocab, dtype=torch.float32, device=h_s.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        m = end - start
        h_c = h_s[start:end]
        if shared:
            # One GEMM for both roles; the two halves are row blocks of one buffer.
            both = _logits_fp32(torch.cat([h_c, h_t[start:end]]), w_mm, None,
                                None if ws is None else ws[: 2 * m])
            s, t = both[:m], both[m:]
            if b_s is not None:
                s += b_s.float()
            if b_t is not None:
                t += b_t.float()
        else:
            s = _logits_fp32(h_c, w_mm, b_s, None if ws is None else ws[:m])
            t = _logits_fp32(h_t[start:end], w_t_mm, b_t, None if ws is None else ws[rows:rows + m])
        labels_c = None if labels is None else labels[start:end]
        step(s, t, labels_c, coef[start:end], stats[start:end], opts, write_grad)
        if not write_grad:
            continue
        if grad_h is not None:
            if w_mm.dtype == torch.float32:
                torch.mm(s, w_mm, out=grad_h[start:end])
            else:
                grad_h[start:end] = torch.mm(s.to(w_mm.dtype), w_mm, out_dtype=torch.float32)
        if grad_w is not None:
            grad_w.addmm_(s.t(), h_c.float())
        if grad_bs is not None:
            grad_bs += s.sum(0)
    return stats, grad_h, grad_w, grad_bs


def logits_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of a logits gradient between forward and backward. fp16 would underflow before
    a loss scale is applied, so it is kept in fp32; bf16 has fp32's range and keeps its own
    dtype, halving the only [N, V] buffer."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def logits_forward_backward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    coef: torch.Tensor,
    opts: RowOptions,
    top_k: TopK | None,
    backend: str,
    chunk_size: int | None,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token stats and, if asked, d (sum_i coef_i D_i) / d student_logits, both from logits.

    The only [N, V] buffer is the gradient itself; fp32 work happens in one chunk at a time.
    """
    n, vocab = student_logits.shape
    step = with_top_k(row_step_for(backend), top_k)
    stats = stats_buffer(n, student_logits.device)
    grad = None
    if need_grad:
        grad = torch.empty(n, vocab, dtype=logits_grad_dtype(student_logits.dtype),
                           device=student_logits.device)
    # The native step reads bf16 rows itself and writes a bf16 gradient over them (fp32 math,
    # rounded once, as the copy below would round it): bf16 logits need no fp32 copy there.
    student_as_is = _native_reads_bf16(backend, top_k, student_logits.dtype)
    teacher_as_is = _native_reads_bf16(backend, top_k, teacher_logits.dtype)
    rows = chunk_rows(n, vocab, backend, chunk_size, student_logits.device)
    # One fp32 workspace for every chunk (see fused_linear_forward_backward).
    ws = None
    if not student_as_is:
        ws = torch.empty(min(rows, n), vocab, dtype=torch.float32, device=student_logits.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        if ws is not None:
            # A copy even for fp32 input: the row step writes the gradient over it.
            s = ws[: end - start].copy_(student_logits[start:end])
        elif grad is not None:
            s = grad[start:end].copy_(student_logits[start:end])
        else:
            s = student_logits[start:end]  # only read without a gradient to write
        t = teacher_logits[start:end]
        t = t if teacher_as_is else t.float()
        labels_c = None if labels is None else labels[start:end]
        step(s, t, labels_c, coef[start:end], stats[start:end], opts, need_grad)
        if grad is not None and ws is not None:
            grad[start:end] = s
    return stats, grad


def _native_reads_bf16(backend: str, top_k: TopK | None, dtype: torch.dtype) -> bool:
    """Whether bf16 logits go to the row step as they are: the native step reads them on full
    rows (top-k rows are gathered in fp32 anyway; the other steps take fp32 only)."""
    return backend == "native" and top_k is None and dtype == torch.bfloat16
