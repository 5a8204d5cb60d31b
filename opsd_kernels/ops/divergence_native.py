"""The native row step's launcher: the compiled kernels of csrc/ (CPU, and CUDA when built),
called through the operator `opsd::divergence_rows_native_` that opsd_kernels._C registers."""

from __future__ import annotations

import torch

from opsd_kernels import _native
from opsd_kernels.divergence_options import KIND_CODES, RowOptions


def divergence_rows_native_(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                            coef: torch.Tensor, stats: torch.Tensor, opts: RowOptions,
                            write_grad: bool) -> None:
    """The row step of `divergence_rows_torch_` / `divergence_rows_triton_`, compiled.

    s, t: fp32 or bf16 [C, V] with unit column stride (s is overwritten with
    coef_i * d D_i / d z_S when write_grad, and left untouched otherwise); labels int64 [C]
    or None; coef fp32 [C]; stats fp32 [C, NUM_STATS]. Contract: csrc/divergence.h."""
    module, why = _native._load()
    if module is None:
        raise RuntimeError(f"backend='native' cannot run: {why}")
    torch.ops.opsd.divergence_rows_native_(
        s, t, labels, coef, stats, KIND_CODES[opts.kind], opts.beta, opts.inv_tau_s,
        opts.inv_tau_t, opts.clip, opts.softcap, opts.ignore_index, write_grad)
