// Host side of the CPU row step: argument checks, the instruction-set choice, and the threads
// (at::parallel_for over rows, three fp32 scratch rows per thread). The row kernel itself is
// divergence_kernel.cpp; contract in ../divergence.h.
#include "../divergence.h"

#include <algorithm>
#include <memory>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include "divergence_kernel.h"

namespace opsd {
namespace {

struct Kernel {
  cpu::RowsFn fn;
  const char* isa;
};

// The widest build this CPU runs, as torch sees it (ATEN_CPU_CAPABILITY=default forces the
// baseline build, as it does for torch's own kernels).
Kernel pick_kernel() {
  const std::string cap = at::get_cpu_capability();
#ifdef OPSD_HAVE_AVX512_KERNEL
  if (cap == "AVX512") return {cpu::AVX512::divergence_rows, "AVX512"};
#endif
#ifdef OPSD_HAVE_AVX2_KERNEL
  if (cap == "AVX2" || cap == "AVX512") return {cpu::AVX2::divergence_rows, "AVX2"};
#endif
  return {cpu::DEFAULT::divergence_rows, "DEFAULT"};
}

const Kernel& kernel() {
  static const Kernel k = pick_kernel();
  return k;
}

cpu::Dtype row_dtype(const at::Tensor& x, const char* name) {
  if (x.scalar_type() == at::kFloat) return cpu::Dtype::kFloat;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "divergence_rows_native_: ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
  return cpu::Dtype::kBFloat16;
}

void check_rows(const at::Tensor& x, const char* name, int64_t rows, int64_t vocab) {
  TORCH_CHECK(x.device().is_cpu(), "divergence_rows_native_: ", name, " must be on CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == vocab,
              "divergence_rows_native_: ", name, " must be [", rows, ", ", vocab, "], got ",
              x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || vocab == 1, "divergence_rows_native_: ", name,
              " must have unit column stride");
}

// Rows per task: enough columns that a thread's share is worth waking it for.
constexpr int64_t kGrainColumns = 1 << 15;

}  // namespace

const char* divergence_rows_cpu_isa() { return kernel().isa; }

void divergence_rows_cpu(const at::Tensor& s, const at::Tensor& t,
                         const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                         const at::Tensor& stats, const RowOptions& opts, bool write_grad) {
  TORCH_CHECK(s.dim() == 2, "divergence_rows_native_: s must be 2-D, got ", s.sizes());
  const int64_t rows = s.size(0), vocab = s.size(1);
  check_rows(s, "s", rows, vocab);
  check_rows(t, "t", rows, vocab);
  const cpu::Dtype s_dtype = row_dtype(s, "s"), t_dtype = row_dtype(t, "t");
  TORCH_CHECK(opts.kind >= kForwardKL && opts.kind <= kSampled,
              "divergence_rows_native_: unknown kind ", opts.kind);
  TORCH_CHECK(!(opts.kind == kSampled && opts.has_clip),
              "divergence_rows_native_: clipping is not defined for the sampled-token loss");
  TORCH_CHECK(coef.device().is_cpu() && coef.scalar_type() == at::kFloat && coef.dim() == 1 &&
                  coef.size(0) == rows,
              "divergence_rows_native_: coef must be float32 [", rows, "] on CPU");
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                  stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumStats &&
                  stats.stride(1) == 1,
              "divergence_rows_native_: stats must be float32 [", rows, ", ", kNumStats,
              "] with unit column stride on CPU");
  if (rows == 0) return;
  TORCH_CHECK(vocab > 0, "divergence_rows_native_: empty vocabulary");

  // Tiny [rows] vectors: contiguous copies only if they are strided.
  const at::Tensor coef_c = coef.contiguous();
  at::Tensor labels_c;
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 &&
                    l.size(0) == rows,
                "divergence_rows_native_: labels must be int64 [", rows, "] on CPU");
    labels_c = l.contiguous();
    // On CPU the check costs no host sync: an out-of-range label is an error, not a read.
    const int64_t* lab = labels_c.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(lab[r] == opts.ignore_index || (lab[r] >= 0 && lab[r] < vocab),
                  "divergence_rows_native_: label ", lab[r], " of row ", r,
                  " is outside [0, ", vocab, ") and is not ignore_index ", opts.ignore_index);
    }
  }

  const cpu::RowBlock block{
      s.data_ptr(),
      s.stride(0),
      t.data_ptr(),
      t.stride(0),
      labels_c.defined() ? labels_c.data_ptr<int64_t>() : nullptr,
      coef_c.data_ptr<float>(),
      stats.data_ptr<float>(),
      stats.stride(0),
      vocab,
      s_dtype,
      t_dtype,
  };
  const cpu::RowsFn fn = kernel().fn;
  const int64_t grain = std::max<int64_t>(1, kGrainColumns / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // Uninitialised on purpose: the kernel writes every element it reads.
    const std::unique_ptr<float[]> scratch(new float[cpu::scratch_floats(vocab)]);
    fn(block, opts, write_grad, begin, end, scratch.get());
  });
}

}  // namespace opsd
