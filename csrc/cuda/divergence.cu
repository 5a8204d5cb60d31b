// CUDA kernel for the per-row divergence step (the Triton kernel of
// opsd_kernels/ops/divergence.py, ported; math and numerics notes in divergence_row.h).
//
// One row group per row: a warp (8 rows to a block) for V <= 4096, a 256-thread block above.
// Each thread streams 16-byte packs (4 fp32 or 8 bf16 per role), with a scalar head and tail
// where the row start is not 16-byte aligned or V is not a multiple of the pack. fp32
// accumulation; row reductions by warp shuffles, across warps through shared memory. Up to
// three passes over the row: log-sum-exps, then S = sum_v g_v only for reverse KL / JSD /
// clipping, then the gradient. Both roles share one dtype (fp32 or bf16); the gradient goes to
// fp32 or bf16 rows (over s, or a buffer of its own).
#include <cuda_runtime.h>

#include <cstdint>

#include "divergence_cuda.h"
#include "divergence_row.h"

namespace opsd {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlockThreads = 256;    // one-block-per-row kernel
constexpr int kWarpRowsPerBlock = 8;  // one-warp-per-row kernel
constexpr int64_t kWarpRowMaxVocab = 4096;
// 3 resident blocks of 256 threads (<= 80 registers) with 8 elements per role in flight per
// thread (2 packs of fp32, 1 of bf16): 24-48 KB of loads in flight per SM, about what HBM3
// needs to stay busy. Letting ptxas use more registers buys nothing a memory-bound kernel
// needs and halves the resident blocks.
constexpr int kMinBlocksPerSM = 3;

template <int N>
__device__ __forceinline__ void warp_sum(float (&v)[N]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], off);
  }
}

template <int N>
__device__ __forceinline__ void warp_max(float (&v)[N]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = fmaxf(v[i], __shfl_xor_sync(kFullMask, v[i], off));
  }
}

// A warp owns the row. The xor butterfly leaves bit-identical results in every lane.
struct WarpCtx {
  __device__ __forceinline__ int rank() const { return threadIdx.x & 31; }
  __device__ __forceinline__ int size() const { return 32; }
  template <int N>
  __device__ __forceinline__ void all_sum(float (&v)[N]) const { warp_sum(v); }
  template <int N>
  __device__ __forceinline__ void all_max(float (&v)[N]) const { warp_max(v); }
};

// The block owns the row: warp butterflies, then every thread folds the per-warp partials in
// the same order (bit-identical results everywhere). Two barriers per reduction: the second
// keeps a fast warp from overwriting partials that a slow one has not read.
template <int THREADS>
struct BlockCtx {
  static constexpr int kWarps = THREADS / 32;
  static constexpr int kMaxValues = 7;
  float (*partial)[kMaxValues];  // shared [kWarps][kMaxValues]

  __device__ __forceinline__ int rank() const { return threadIdx.x; }
  __device__ __forceinline__ int size() const { return THREADS; }

  template <int N, bool MAX>
  __device__ __forceinline__ void all_reduce(float (&v)[N]) const {
    static_assert(N <= kMaxValues, "too many values in one reduction");
    if constexpr (MAX) {
      warp_max(v);
    } else {
      warp_sum(v);
    }
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) partial[warp][i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float r = partial[0][i];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) r = MAX ? fmaxf(r, partial[w][i]) : r + partial[w][i];
      v[i] = r;
    }
    __syncthreads();
  }
  template <int N>
  __device__ __forceinline__ void all_sum(float (&v)[N]) const { all_reduce<N, false>(v); }
  template <int N>
  __device__ __forceinline__ void all_max(float (&v)[N]) const { all_reduce<N, true>(v); }
};

// Elements per pack: 16 bytes of the wider role; packs per role loaded before any is used: 8
// elements in flight per thread and role.
template <class TS, class TT>
constexpr int kPackElems =
    16 / static_cast<int>(sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
template <class TS, class TT>
constexpr int kUnroll = 8 / kPackElems<TS, TT>;

template <class Ctx, int KIND, bool SOFTCAP, class TS, class TT>
__device__ __forceinline__ void run_row(const Ctx& ctx, const RowsArgs& a, int64_t row) {
  const TS* s = static_cast<const TS*>(a.s) + row * a.s_stride;
  const TT* t = static_cast<const TT*>(a.t) + row * a.t_stride;
  GradRow g;
  if (a.grad != nullptr && a.grad_dtype == DType::kFloat32) {
    g.f32 = static_cast<float*>(a.grad) + row * a.grad_stride;
  } else if (a.grad != nullptr) {
    g.b16 = static_cast<bf16*>(a.grad) + row * a.grad_stride;
  }
  const bool has_label = a.labels != nullptr;
  const int64_t label = has_label ? a.labels[row] : -1;
  const float coef = g.any() ? a.coef[row] : 0.0f;
  divergence_row<KIND, SOFTCAP, kPackElems<TS, TT>, kUnroll<TS, TT>>(
      ctx, a.opts, s, t, g, a.vocab, has_label, label, coef, a.stats + row * a.stats_stride);
}

template <int KIND, bool SOFTCAP, class TS, class TT>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32, kMinBlocksPerSM)
    divergence_rows_warp_kernel(const RowsArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;  // whole warps: the row's warp is either all in or all out
  run_row<WarpCtx, KIND, SOFTCAP, TS, TT>(WarpCtx{}, a, row);
}

template <int KIND, bool SOFTCAP, class TS, class TT>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    divergence_rows_block_kernel(const RowsArgs a) {
  using Ctx = BlockCtx<kBlockThreads>;
  __shared__ float partial[Ctx::kWarps][Ctx::kMaxValues];
  run_row<Ctx, KIND, SOFTCAP, TS, TT>(Ctx{partial}, a, static_cast<int64_t>(blockIdx.x));
}

template <int KIND, bool SOFTCAP, class TS, class TT>
cudaError_t launch(const RowsArgs& a, cudaStream_t stream) {
  if (a.vocab <= kWarpRowMaxVocab) {
    const int64_t blocks = (a.rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    divergence_rows_warp_kernel<KIND, SOFTCAP, TS, TT>
        <<<static_cast<unsigned>(blocks), kWarpRowsPerBlock * 32, 0, stream>>>(a);
  } else {
    divergence_rows_block_kernel<KIND, SOFTCAP, TS, TT>
        <<<static_cast<unsigned>(a.rows), kBlockThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <int KIND, bool SOFTCAP>
cudaError_t dispatch_dtypes(const RowsArgs& a, cudaStream_t stream) {
  return a.s_dtype == DType::kFloat32 ? launch<KIND, SOFTCAP, float, float>(a, stream)
                                      : launch<KIND, SOFTCAP, bf16, bf16>(a, stream);
}

template <int KIND>
cudaError_t dispatch_softcap(const RowsArgs& a, cudaStream_t stream) {
  return a.opts.has_softcap ? dispatch_dtypes<KIND, true>(a, stream)
                            : dispatch_dtypes<KIND, false>(a, stream);
}

bool valid_dtype(DType d) { return d == DType::kFloat32 || d == DType::kBFloat16; }

}  // namespace

int divergence_rows_cuda_row_threads(int64_t vocab) {
  return vocab <= kWarpRowMaxVocab ? 32 : kBlockThreads;
}

cudaError_t divergence_rows_cuda(const RowsArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.vocab < 1 || a.s == nullptr || a.t == nullptr || a.stats == nullptr ||
      (a.grad != nullptr && a.coef == nullptr) || !valid_dtype(a.s_dtype) ||
      a.t_dtype != a.s_dtype || !valid_dtype(a.grad_dtype) ||
      (a.rows > 1 && a.stats_stride < kNumStats) || a.rows > INT32_MAX ||
      (a.opts.kind == kSampled && a.opts.has_clip)) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;
  switch (a.opts.kind) {
    case kForwardKL:
      return dispatch_softcap<kForwardKL>(a, stream);
    case kReverseKL:
      return dispatch_softcap<kReverseKL>(a, stream);
    case kJSD:
      return dispatch_softcap<kJSD>(a, stream);
    case kSampled:
      return dispatch_softcap<kSampled>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace opsd
