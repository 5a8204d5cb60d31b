// The per-row divergence step of opsd_kernels, shared by the CPU (csrc/cpu/) and CUDA
// (csrc/cuda/) ports. Contract and math: opsd_kernels/ops/divergence.py (the Triton kernel and
// its derivation) and opsd_kernels/ops/divergence_torch.py (the PyTorch form); every port has
// exactly their contract:
//   s      [C, V] fp32 or bf16, unit column stride: student logits; overwritten with
//          coef_i * d D_i / d z_S (in s's dtype) when write_grad, left untouched otherwise.
//   t      [C, V] fp32 or bf16, unit column stride: teacher logits, only read.
//   labels int64 [C] or none: rows equal to ignore_index get zero stats and a zero gradient,
//          and their logits are never read (they may hold inf / NaN).
//   coef   fp32 [C]: per-row weight of the gradient.
//   stats  fp32 [C, kNumStats], unit column stride: every element written (columns, kind codes
//          and RowOptions: divergence_options.h).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "divergence_options.h"

namespace opsd {

// CPU port (csrc/cpu/divergence.cpp): parallel over rows with at::parallel_for.
void divergence_rows_cpu(const at::Tensor& s, const at::Tensor& t,
                         const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                         const at::Tensor& stats, const RowOptions& opts, bool write_grad);
// The instruction set of the CPU kernel build chosen at run time ("AVX512", "AVX2", "DEFAULT").
const char* divergence_rows_cpu_isa();

// CUDA port (csrc/cuda/*.cu), compiled and registered only when OPSD_WITH_CUDA is defined.
void divergence_rows_cuda(const at::Tensor& s, const at::Tensor& t,
                          const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                          const at::Tensor& stats, const RowOptions& opts, bool write_grad);

}  // namespace opsd
