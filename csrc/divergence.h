// The per-row divergence step of opsd_kernels, shared by the CPU (csrc/cpu/) and CUDA
// (csrc/cuda/) ports. Contract and math: opsd_kernels/ops/divergence.py (the Triton kernel and
// its derivation) and opsd_kernels/reference/rows.py (the PyTorch form); every port has exactly
// their contract:
//   s      [C, V] fp32 or bf16, unit column stride: student logits; overwritten with
//          coef_i * d D_i / d z_S (in s's dtype) when write_grad, left untouched otherwise.
//   t      [C, V] fp32 or bf16, unit column stride: teacher logits, only read.
//   labels int64 [C] or none: rows equal to ignore_index get zero stats and a zero gradient,
//          and their logits are never read (they may hold inf / NaN).
//   coef   fp32 [C]: per-row weight of the gradient.
//   stats  fp32 [C, kNumStats], unit column stride: every element written (columns below).
#pragma once

#include <cstdint>

namespace opsd {

// Divergence codes: KIND_CODES in opsd_kernels/row_options.py (and ops/divergence.py).
enum Kind : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSampled = 3 };

// Columns of stats (opsd_kernels/types.py STAT_NAMES): divergence, student entropy, teacher
// entropy, student lse, teacher lse, student logprob(label), teacher logprob(label).
constexpr int kNumStats = 7;

// Scalar options, normalised on the host (opsd_kernels.row_options.RowOptions): "jsd" with
// beta 0 or 1 arrives as kForwardKL / kReverseKL, so kernels never special-case beta.
// s = softcap * tanh(z / softcap) * inv_tau (without has_softcap: z * inv_tau), per role.
struct RowOptions {
  int kind;
  float beta, inv_tau_s, inv_tau_t, clip;
  bool has_clip;
  float softcap;
  bool has_softcap;
  int64_t ignore_index;
};

}  // namespace opsd

// The per-ISA CPU kernel files define OPSD_ROW_OPTIONS_ONLY: they are compiled with extra
// instruction sets and include as few headers as possible (see csrc/cpu/divergence_kernel.h).
#ifndef OPSD_ROW_OPTIONS_ONLY
#include <optional>

#include <ATen/core/Tensor.h>

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
#endif  // OPSD_ROW_OPTIONS_ONLY
