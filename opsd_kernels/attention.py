"""Shared-prefix attention: the registered ops and the public function.

The suffix rows of one group (the n rollouts of a problem, or teacher and student branches)
attend to one copy of the group's prefix K/V, which is never repeated per row (Hydragen). Math,
masks and the float64 oracle are in `opsd_kernels.reference.attention`; the backends in
`opsd_kernels.ops`: Triton kernels in `attention` (imported only when that backend runs), the
PyTorch forms in `attention_torch`.

Ladder: launchers (ops/) -> allocating wrappers (`_forward`, `_backward`) ->
`opsd::shared_prefix_attention` (returns (out, lse); autograd calls
`opsd::shared_prefix_attention_backward`) -> `shared_prefix_attention`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opsd_kernels import _validate as v
from opsd_kernels._backend import resolve_backend
from opsd_kernels.ops.attention_torch import (
    shared_prefix_attention_bwd_torch,
    shared_prefix_attention_fwd_torch,
)

KERNELS: tuple[str, ...] = ("triton", "torch")  # no native kernel
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", *KERNELS)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EMPTY = (0,)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- allocating wrappers --------------------------------------------------------------------------


def _forward(q, k, v_, pk, pv, gi, pl, sl, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from opsd_kernels.ops.attention import shared_prefix_attention_fwd_triton_

        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        shared_prefix_attention_fwd_triton_(q, k, v_, pk, pv, gi, pl, sl, scale, out, lse)
        return out, lse
    return shared_prefix_attention_fwd_torch(q, k, v_, pk, pv, gi, pl, sl, scale)


def _backward(grad_out, q, k, v_, pk, pv, gi, pl, sl, out, lse, scale: float, backend: str,
              prefix_grad: bool) -> tuple[Tensor, ...]:
    if backend == "triton":
        from opsd_kernels.ops.attention import shared_prefix_attention_bwd_triton_

        dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v_.new_empty(v_.shape)
        dpk = pk.new_empty(pk.shape) if prefix_grad else pk.new_empty(_EMPTY)
        dpv = pv.new_empty(pv.shape) if prefix_grad else pv.new_empty(_EMPTY)
        shared_prefix_attention_bwd_triton_(
            grad_out, q, k, v_, pk, pv, gi, pl, sl, out, lse, scale, dq, dk, dv,
            dpk if prefix_grad else None, dpv if prefix_grad else None)
        return dq, dk, dv, dpk, dpv
    dq, dk, dv, dpk, dpv = shared_prefix_attention_bwd_torch(
        grad_out, q, k, v_, pk, pv, gi, pl, sl, out, lse, scale, prefix_grad)
    if not prefix_grad:
        dpk, dpv = pk.new_empty(_EMPTY), pv.new_empty(_EMPTY)
    return dq, dk, dv, dpk, dpv


# --- registered ops -------------------------------------------------------------------------------


@torch.library.custom_op("opsd::shared_prefix_attention", mutates_args=())
def shared_prefix_attention_op(
    query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
    group_index: Tensor, prefix_lengths: Tensor, suffix_lengths: Tensor, scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out [B, Hq, R, D] in the input dtype, lse [B, Hq, R] fp32 (fp64 for fp64 inputs)),
    both contiguous and 0 on padded queries. backend: "triton" or "torch" (resolved)."""
    return _forward(query, key, value, prefix_key, prefix_value, group_index, prefix_lengths,
                    suffix_lengths, scale, backend)


@shared_prefix_attention_op.register_fake
def _(query, key, value, prefix_key, prefix_value, group_index, prefix_lengths, suffix_lengths,
      scale, backend):
    return (query.new_empty(query.shape),
            query.new_empty(query.shape[:3], dtype=_lse_dtype(query.dtype)))


@torch.library.custom_op("opsd::shared_prefix_attention_backward", mutates_args=())
def shared_prefix_attention_backward_op(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor,
    prefix_value: Tensor, group_index: Tensor, prefix_lengths: Tensor, suffix_lengths: Tensor,
    out: Tensor, lse: Tensor, scale: float, backend: str, prefix_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_key, dprefix_value) in the input dtype, contiguous; the prefix
    gradients are empty tensors unless prefix_grad."""
    return _backward(grad_out.contiguous(), query, key, value, prefix_key, prefix_value,
                     group_index, prefix_lengths, suffix_lengths, out.contiguous(),
                     lse.contiguous(), scale, backend, prefix_grad)


@shared_prefix_attention_backward_op.register_fake
def _(grad_out, query, key, value, prefix_key, prefix_value, group_index, prefix_lengths,
      suffix_lengths, out, lse, scale, backend, prefix_grad):
    def prefix_like(x: Tensor) -> Tensor:
        return x.new_empty(x.shape if prefix_grad else _EMPTY)

    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            prefix_like(prefix_key), prefix_like(prefix_value))


def _setup_context(ctx, inputs, output) -> None:
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs[:8], out, lse)
    ctx.scale, ctx.backend = inputs[8], inputs[9]


def _backward_attention(ctx, grad_out, _grad_lse):
    need = ctx.needs_input_grad
    if not any(need[:5]):
        return (None,) * 10
    q, k, v_, pk, pv, gi, pl, sl, out, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = shared_prefix_attention_backward_op(
        grad_out, q, k, v_, pk, pv, gi, pl, sl, out, lse, ctx.scale, ctx.backend,
        need[3] or need[4])
    grads = (dq, dk, dv, dpk, dpv)
    return tuple(g if n else None for g, n in zip(grads, need[:5], strict=True)) + (None,) * 5


shared_prefix_attention_op.register_autograd(_backward_attention, setup_context=_setup_context)


# --- validation and the public function -----------------------------------------------------------


def _check_float(name: str, x: Tensor, backend: str) -> None:
    if backend == "torch":
        v.check_float_tensor(name, x, (4,), _FLOAT_DTYPES + (torch.float64,), why="")
    else:
        v.check_float_tensor(name, x, (4,), _FLOAT_DTYPES, why=f"; backend {backend!r}, "
                             "float64 needs backend='torch'")


def _lengths(name: str, lengths: Tensor | None, count: int, limit: int, device: torch.device,
             meaning: str, limit_name: str) -> Tensor:
    """The real lengths (all `limit` when None), checked to lie in [1, limit]."""
    checked = v.lengths_or_full(name, lengths, count, limit, device, "query", meaning)
    if lengths is not None:
        v.check_values((checked >= 1) & (checked <= limit),
                       f"{name}: values must be in [1, {limit}] ({limit_name})")
    return checked


def _validate(query, key, value, prefix_key, prefix_value, group_index, prefix_lengths,
              suffix_lengths, scale, backend) -> tuple[Tensor, Tensor, Tensor, float, str]:
    for name, x in (("query", query), ("key", key), ("value", value),
                    ("prefix_key", prefix_key), ("prefix_value", prefix_value)):
        v.check(isinstance(x, Tensor), f"{name}: expected a tensor, got {type(x).__name__}")
    device = query.device
    v.check_same_device(query=query, key=key, value=value, prefix_key=prefix_key,
                        prefix_value=prefix_value)
    # stacklevel 4: a fallback warning names the caller of shared_prefix_attention.
    backend = resolve_backend(backend, device, KERNELS, "shared-prefix attention", stacklevel=4)
    for name, x in (("query", query), ("key", key), ("value", value),
                    ("prefix_key", prefix_key), ("prefix_value", prefix_value)):
        _check_float(name, x, backend)
        v.check(x.dtype == query.dtype, f"{name}: dtype {x.dtype} differs from query's "
                f"{query.dtype}; all five inputs must share one dtype")
    b, hq, r, d = query.shape
    g, hkv, p = prefix_key.shape[0], prefix_key.shape[1], prefix_key.shape[2]
    v.check(r >= 1 and d >= 1 and hq >= 1, f"query: expected [B, Hq, R >= 1, D >= 1], got "
            f"{tuple(query.shape)}")
    v.check(g >= 1 and hkv >= 1 and p >= 1, f"prefix_key: expected [G >= 1, Hkv >= 1, P >= 1, "
            f"D], got {tuple(prefix_key.shape)}")
    v.check(prefix_key.shape[3] == d, f"prefix_key: head dim {prefix_key.shape[3]} differs from "
            f"query's {d}")
    v.check(hq % hkv == 0, f"query: {hq} heads is not a multiple of the {hkv} K/V heads "
            "(prefix_key.shape[1])")
    for name, x in (("key", key), ("value", value)):
        v.check(tuple(x.shape) == (b, hkv, r, d), f"{name}: expected shape {(b, hkv, r, d)} "
                f"([B, Hkv, R, D] from query and prefix_key), got {tuple(x.shape)}")
    v.check(tuple(prefix_value.shape) == tuple(prefix_key.shape), f"prefix_value: expected "
            f"shape {tuple(prefix_key.shape)} (prefix_key's), got {tuple(prefix_value.shape)}")
    if backend == "triton":
        from opsd_kernels.ops.attention import MAX_GRID_ROWS, MAX_HEAD_DIM

        v.check(d <= MAX_HEAD_DIM, f"query: head dim {d} exceeds the Triton kernels' "
                f"{MAX_HEAD_DIM}; use backend='torch'")
        v.check(b <= MAX_GRID_ROWS, f"query: {b} suffix rows exceed the Triton kernels' "
                f"{MAX_GRID_ROWS} (a CUDA grid dimension); split the batch")
        v.check(g <= MAX_GRID_ROWS, f"prefix_key: {g} groups exceed the Triton kernels' "
                f"{MAX_GRID_ROWS} (a CUDA grid dimension); split the batch")
    gi = v.check_index("group_index", group_index, (b,), device, "query",
                       "B, one per suffix row")
    v.check_values((gi >= 0) & (gi < g), f"group_index: values must be in [0, {g}) (G = "
                   "prefix_key.shape[0])")
    pl = _lengths("prefix_lengths", prefix_lengths, g, p, device, "G, one per prefix",
                  "P = prefix_key.shape[2]")
    sl = _lengths("suffix_lengths", suffix_lengths, b, r, device, "B, one per suffix row",
                  "R = query.shape[2]")
    if scale is None:
        scale = d**-0.5
    v.check(isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0,
            f"scale: must be a finite number > 0, got {scale!r}")
    return gi, pl, sl, float(scale), backend


def shared_prefix_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    prefix_key: Tensor,
    prefix_value: Tensor,
    group_index: Tensor,
    prefix_lengths: Tensor | None = None,
    suffix_lengths: Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of suffix rows over their group's shared prefix and their own causal suffix.

    Query r of row b attends to prefix positions [0, prefix_lengths[g]) of its group
    g = group_index[b] (no causal mask) and to suffix positions [0, r] of row b. The prefix K/V
    is stored once per group and never repeated per row or per query head (GQA). Position ids
    of the suffix tokens (rotary embeddings) are the caller's business.

    Args:
        query: suffix queries [B, Hq, R, D].
        key, value: suffix keys / values [B, Hkv, R, D]; Hq must be a multiple of Hkv.
        prefix_key, prefix_value: [G, Hkv, P, D], one right-padded prefix per group.
        group_index: int [B] in [0, G): the prefix each suffix row attends to. Groups may have
            any number of rows, including none.
        prefix_lengths: int [G], real prefix lengths in [1, P]; None means all P.
        suffix_lengths: int [B], real suffix lengths in [1, R]; None means all R. Queries at or
            past a row's length are padding: their output is 0 and they get no gradient.
        scale: softmax scale; default D ** -0.5.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere; OPSD_BACKEND=triton / torch
            overrides it, see `opsd_kernels._backend.resolve_backend`), "triton" or "torch".
            float64 inputs need "torch". On CPU "torch" runs torch's fused CPU attention
            kernels per group, on other devices a masked form in chunks of rows
            (`opsd_kernels.ops.attention_torch`).

    Returns:
        out [B, Hq, R, D] in the input dtype, differentiable w.r.t. query, key, value,
        prefix_key and prefix_value.
    """
    gi, pl, sl, scale, backend = _validate(query, key, value, prefix_key, prefix_value,
                                           group_index, prefix_lengths, suffix_lengths, scale,
                                           backend)
    out, _ = shared_prefix_attention_op(query, key, value, prefix_key, prefix_value, gi, pl, sl,
                                        scale, backend)
    return out
