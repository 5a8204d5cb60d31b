// The seam between the host side of the CPU port (divergence.cpp: checks, threads) and its
// row kernel (divergence_kernel.cpp), which CMake compiles once per instruction set: DEFAULT
// (baseline x86-64 / any CPU) and, where the compiler supports it, AVX2+FMA. ATen's
// Vectorized<float> picks its ISA from the CPU_CAPABILITY_* macros at compile time, and both
// it and the kernel live in a namespace named after CPU_CAPABILITY, so the two copies never
// collide; divergence.cpp picks one at run time from at::get_cpu_capability().
//
// Only plain pointers cross this seam, so the per-ISA files include no tensor headers.
#pragma once

#include <cstdint>

#include "../divergence_options.h"

namespace opsd::cpu {

enum class Dtype : int { kFloat = 0, kBFloat16 = 1 };

struct RowBlock {
  void* s;              // [rows, vocab], row stride s_stride (elements), dtype s_dtype
  int64_t s_stride;
  const void* t;        // [rows, vocab], row stride t_stride, dtype t_dtype
  int64_t t_stride;
  const int64_t* labels;  // [rows] or nullptr
  const float* coef;      // [rows]
  float* stats;           // [rows, kNumStats], row stride stats_stride
  int64_t stats_stride;
  int64_t vocab;
  Dtype s_dtype, t_dtype;
};

// Every kernel build pads the scratch rows to a multiple of this many floats (>= any vector
// width it is compiled for).
constexpr int64_t kPad = 64;
inline int64_t padded(int64_t vocab) { return (vocab + kPad - 1) / kPad * kPad; }
// fp32 scratch one thread needs: three padded rows.
inline int64_t scratch_floats(int64_t vocab) { return 3 * padded(vocab); }

// Rows [begin, end) of the block; scratch holds scratch_floats(vocab) floats for this thread.
using RowsFn = void (*)(const RowBlock& block, const RowOptions& opts, bool write_grad,
                        int64_t begin, int64_t end, float* scratch);

namespace DEFAULT {
void divergence_rows(const RowBlock& block, const RowOptions& opts, bool write_grad,
                     int64_t begin, int64_t end, float* scratch);
}
#ifdef OPSD_HAVE_AVX2_KERNEL
namespace AVX2 {
void divergence_rows(const RowBlock& block, const RowOptions& opts, bool write_grad,
                     int64_t begin, int64_t end, float* scratch);
}
#endif
#ifdef OPSD_HAVE_AVX512_KERNEL
namespace AVX512 {
void divergence_rows(const RowBlock& block, const RowOptions& opts, bool write_grad,
                     int64_t begin, int64_t end, float* scratch);
}
#endif

}  // namespace opsd::cpu
