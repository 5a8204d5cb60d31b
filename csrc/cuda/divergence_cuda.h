// Host launchers of the CUDA per-row divergence kernel (divergence.cu), over raw pointers.
// No torch headers: the torch-facing wrapper is divergence_cuda_torch.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "divergence_row.h"

namespace opsd {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

// One block of rows: the contract of the PyTorch and Triton row steps
// (opsd_kernels/ops/divergence_torch.py, opsd_kernels/ops/divergence.py, ../divergence.h).
//   s      [rows, vocab] student logits (raw), dtype s_dtype, unit column stride, row stride
//          s_stride elements. Only read (unless grad points at it).
//   t      [rows, vocab] teacher logits, likewise (t_stride; t_dtype == s_dtype). Only read.
//   grad   [rows, vocab], dtype grad_dtype (fp32, or bf16 rounded to nearest even), row stride
//          grad_stride: receives coef_i * d D_i / d z_S when not nullptr (every element, 0 on
//          masked rows); nullptr: no gradient, s is left untouched. It may be s itself (same
//          dtype and stride: the gradient overwrites the logits, as the other row steps do);
//          any other overlap with s or t is not allowed. Computed in fp32 either way.
//   labels [rows] int64 or nullptr: rows whose label equals ignore_index get zero stats and
//          a zero gradient, and their logits are never read (they may hold inf / NaN). Other
//          labels must lie in [0, vocab); one outside is not read (its log-probs come out
//          -inf) since checking would cost a host sync.
//   coef   [rows] fp32 (read only when grad is not nullptr).
//   stats  [rows, kNumStats] fp32, row stride stats_stride: divergence, student entropy,
//          teacher entropy, student lse, teacher lse, log p(label), log q(label) (the last two
//          0 without labels). Every element is written.
// Rows are 16-byte vectorised wherever s, t and grad share an alignment phase (any start
// address and any vocab are correct; the usual contiguous fp32 / bf16 blocks with vocab a
// multiple of 4 / 8 are fastest).
struct RowsArgs {
  const void* s = nullptr;
  const void* t = nullptr;
  void* grad = nullptr;
  const int64_t* labels = nullptr;
  const float* coef = nullptr;
  float* stats = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t s_stride = 0;
  int64_t t_stride = 0;
  int64_t grad_stride = 0;
  int64_t stats_stride = kNumStats;
  DType s_dtype = DType::kFloat32;
  DType t_dtype = DType::kFloat32;
  DType grad_dtype = DType::kFloat32;
  RowOptions opts{};
};

// Enqueue the kernel on `stream`. Returns cudaErrorInvalidValue for arguments outside the
// contract (null pointers, unknown kind, clipping with the sampled kind, vocab < 1), else the
// launch status (cudaGetLastError). No synchronisation.
cudaError_t divergence_rows_cuda(const RowsArgs& args, cudaStream_t stream);

// Which launch configuration a vocabulary size gets: 32 (one warp per row, several rows per
// block) or the block size of the one-block-per-row kernel. For tests and benchmarks.
int divergence_rows_cuda_row_threads(int64_t vocab);

}  // namespace cuda
}  // namespace opsd
