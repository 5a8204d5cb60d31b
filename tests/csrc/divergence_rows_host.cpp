// Host harness of the CUDA row step: runs csrc/cuda/divergence_row.h, the code the kernel runs,
// on the CPU. A row group of `threads` std::threads (a warp is 32, a block 256) shares each
// row, with barrier-based all-reduces standing in for warp shuffles and shared memory, so the
// lane partitioning, the 16-byte packs with their scalar head and tail, the three passes and
// the reductions are exercised as written. Only the device intrinsics differ (std::exp / log
// for __expf / __logf, plain loads for vector loads).
//
// Built by tests/test_cuda_compile.py:
//   g++ -std=c++20 -O2 -shared -fPIC -pthread -I csrc/cuda tests/csrc/divergence_rows_host.cpp
// and called through ctypes (opsd_divergence_rows_host below).
#include <barrier>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "divergence_row.h"

namespace {

using opsd::cuda::bf16;
using opsd::RowOptions;

struct HostGroup {
  explicit HostGroup(int n) : size(n), bar(n), buf(static_cast<size_t>(n) * kMax) {}
  static constexpr int kMax = 7;
  int size;
  std::barrier<> bar;
  std::vector<float> buf;
};

// Every member folds the partials in lane order: bit-identical results, as on the device.
struct HostCtx {
  HostGroup* group;
  int lane;
  int rank() const { return lane; }
  int size() const { return group->size; }

  template <int N, bool MAX>
  void all_reduce(float (&v)[N]) const {
    static_assert(N <= HostGroup::kMax);
    float* buf = group->buf.data();
    for (int i = 0; i < N; ++i) buf[lane * HostGroup::kMax + i] = v[i];
    group->bar.arrive_and_wait();
    for (int i = 0; i < N; ++i) {
      float r = buf[i];
      for (int w = 1; w < group->size; ++w) {
        const float x = buf[w * HostGroup::kMax + i];
        r = MAX ? (x > r ? x : r) : r + x;
      }
      v[i] = r;
    }
    group->bar.arrive_and_wait();
  }
  template <int N>
  void all_sum(float (&v)[N]) const { all_reduce<N, false>(v); }
  template <int N>
  void all_max(float (&v)[N]) const { all_reduce<N, true>(v); }
};

struct Args {
  const void* s;
  const void* t;
  void* grad;
  bool grad_bf16;
  const int64_t* labels;
  const float* coef;
  float* stats;
  int64_t rows, vocab, s_stride, t_stride, grad_stride, stats_stride;
  RowOptions opts;
};

template <int KIND, bool SOFTCAP, class T>
void run(const Args& a, int threads) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kUnroll = 2;  // as in divergence.cu
  HostGroup group(threads);
  auto body = [&](int lane) {
    const HostCtx ctx{&group, lane};
    for (int64_t row = 0; row < a.rows; ++row) {
      const T* s = static_cast<const T*>(a.s) + row * a.s_stride;
      const T* t = static_cast<const T*>(a.t) + row * a.t_stride;
      opsd::cuda::GradRow g;
      if (a.grad != nullptr && a.grad_bf16) {
        g.b16 = static_cast<bf16*>(a.grad) + row * a.grad_stride;
      } else if (a.grad != nullptr) {
        g.f32 = static_cast<float*>(a.grad) + row * a.grad_stride;
      }
      const bool has_label = a.labels != nullptr;
      opsd::cuda::divergence_row<KIND, SOFTCAP, kVec, kUnroll>(
          ctx, a.opts, s, t, g, a.vocab, has_label, has_label ? a.labels[row] : -1,
          g.any() ? a.coef[row] : 0.0f, a.stats + row * a.stats_stride);
    }
  };
  std::vector<std::thread> pool;
  for (int lane = 1; lane < threads; ++lane) pool.emplace_back(body, lane);
  body(0);
  for (auto& th : pool) th.join();
}

template <int KIND>
void dispatch(const Args& a, bool bf16_rows, int threads) {
  if (a.opts.has_softcap) {
    bf16_rows ? run<KIND, true, bf16>(a, threads) : run<KIND, true, float>(a, threads);
  } else {
    bf16_rows ? run<KIND, false, bf16>(a, threads) : run<KIND, false, float>(a, threads);
  }
}

}  // namespace

// dtype: of both logits roles, grad_dtype: of the gradient rows (0 fp32, 1 bf16); the contract
// of RowsArgs in csrc/cuda/divergence_cuda.h. Returns 0, or -1 for arguments outside it.
extern "C" int opsd_divergence_rows_host(
    const void* s, const void* t, void* grad, const int64_t* labels, const float* coef,
    float* stats, int64_t rows, int64_t vocab, int64_t s_stride, int64_t t_stride,
    int64_t grad_stride, int64_t stats_stride, int dtype, int grad_dtype, int kind, float beta,
    float inv_tau_s,
    float inv_tau_t, float clip, int has_clip, float softcap, int has_softcap,
    int64_t ignore_index, int threads) {
  if (threads < 1 || rows < 0 || vocab < 1 || (dtype != 0 && dtype != 1) ||
      (grad_dtype != 0 && grad_dtype != 1) || (kind == opsd::kSampled && has_clip)) {
    return -1;
  }
  const RowOptions opts{kind, beta, inv_tau_s, inv_tau_t, clip, has_clip != 0,
                       softcap, has_softcap != 0, ignore_index};
  const Args a{s,     t,        grad,     grad_dtype == 1, labels,       coef,
               stats, rows,     vocab,    s_stride,        t_stride,     grad_stride,
               stats_stride, opts};
  try {
    switch (kind) {
      case opsd::kForwardKL: dispatch<opsd::kForwardKL>(a, dtype == 1, threads); break;
      case opsd::kReverseKL: dispatch<opsd::kReverseKL>(a, dtype == 1, threads); break;
      case opsd::kJSD: dispatch<opsd::kJSD>(a, dtype == 1, threads); break;
      case opsd::kSampled: dispatch<opsd::kSampled>(a, dtype == 1, threads); break;
      default: return -1;
    }
  } catch (const std::exception&) {
    return -1;
  }
  return 0;
}
