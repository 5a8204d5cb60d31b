// Torch side of the CUDA row step: tensor checks, the device guard and current stream, then
// the raw-pointer launcher of divergence.cu. Compiled only when torch has CUDA (OPSD_WITH_CUDA);
// contract in ../divergence.h and divergence_cuda.h.
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "../divergence.h"
#include "divergence_cuda.h"

namespace opsd {
namespace {

constexpr const char* kWhat = "divergence_rows_cuda";

void check_rows(const at::Tensor& x, const char* name, const at::Tensor& s) {
  TORCH_CHECK(x.is_cuda() && x.device() == s.device(), kWhat, ": ", name, " must be on ",
              s.device(), ", got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == s.size(0) && x.size(1) == s.size(1), kWhat, ": ",
              name, " must be [", s.size(0), ", ", s.size(1), "], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, kWhat, ": ", name,
              " must have unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kWhat, ": ",
              name, " must be float32 or bfloat16, got ", x.scalar_type());
}

cuda::DType dtype_of(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? cuda::DType::kFloat32 : cuda::DType::kBFloat16;
}

// Shape, device and dtype checks; returns contiguous labels and coef (tiny [C] vectors: copied
// only when strided).
void check_common(const at::Tensor& s, const at::Tensor& t,
                  const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                  const at::Tensor& stats, const RowOptions& opts, at::Tensor& labels_c,
                  at::Tensor& coef_c) {
  TORCH_CHECK(s.is_cuda(), kWhat, ": s must be a CUDA tensor, got ", s.device());
  TORCH_CHECK(s.dim() == 2, kWhat, ": s must be 2-D, got ", s.sizes());
  check_rows(s, "s", s);
  check_rows(t, "t", s);
  const int64_t rows = s.size(0);
  TORCH_CHECK(opts.kind >= kForwardKL && opts.kind <= kSampled, kWhat, ": unknown kind ",
              opts.kind);
  TORCH_CHECK(!(opts.kind == kSampled && opts.has_clip), kWhat,
              ": clipping is not defined for the sampled-token loss");
  TORCH_CHECK(coef.device() == s.device() && coef.scalar_type() == at::kFloat &&
                  coef.dim() == 1 && coef.size(0) == rows,
              kWhat, ": coef must be float32 [", rows, "] on ", s.device());
  TORCH_CHECK(stats.device() == s.device() && stats.scalar_type() == at::kFloat &&
                  stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumStats &&
                  stats.stride(1) == 1,
              kWhat, ": stats must be float32 [", rows, ", ", kNumStats,
              "] with unit column stride on ", s.device());
  TORCH_CHECK(rows <= INT32_MAX, kWhat, ": at most 2^31 - 1 rows per call, got ", rows);
  coef_c = coef.contiguous();
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.device() == s.device() && l.scalar_type() == at::kLong && l.dim() == 1 &&
                    l.size(0) == rows,
                kWhat, ": labels must be int64 [", rows, "] on ", s.device());
    labels_c = l.contiguous();
  }
}

void launch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& labels_c,
            const at::Tensor& coef_c, const at::Tensor& stats, const RowOptions& opts,
            const at::Tensor* grad) {
  cuda::RowsArgs a;
  a.s = s.data_ptr();
  a.t = t.data_ptr();
  a.labels = labels_c.defined() ? labels_c.data_ptr<int64_t>() : nullptr;
  a.coef = coef_c.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.rows = s.size(0);
  a.vocab = s.size(1);
  a.s_stride = s.stride(0);
  a.t_stride = t.stride(0);
  a.stats_stride = stats.stride(0);
  a.s_dtype = dtype_of(s);
  a.t_dtype = dtype_of(t);
  if (grad != nullptr) {
    a.grad = grad->data_ptr();
    a.grad_stride = grad->stride(0);
    a.grad_dtype = dtype_of(*grad);
  }
  a.opts = opts;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  const cudaError_t err = cuda::divergence_rows_cuda(a, stream);
  TORCH_CHECK(err == cudaSuccess, kWhat, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The kernel takes both roles in one dtype; a mixed pair runs on an fp32 copy of the bf16 one.
at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
}

}  // namespace

void divergence_rows_cuda(const at::Tensor& s, const at::Tensor& t,
                          const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                          const at::Tensor& stats, const RowOptions& opts, bool write_grad) {
  at::Tensor labels_c, coef_c;
  check_common(s, t, labels, coef, stats, opts, labels_c, coef_c);
  if (s.size(0) == 0) return;
  TORCH_CHECK(s.size(1) > 0, kWhat, ": empty vocabulary");
  TORCH_CHECK(!write_grad || !s.is_same(t), kWhat, ": s and t must be different tensors");
  const c10::cuda::CUDAGuard guard(s.device());
  if (s.scalar_type() == t.scalar_type()) {
    // The gradient over s, in s's dtype (bf16 rounded to nearest even).
    launch(s, t, labels_c, coef_c, stats, opts, write_grad ? &s : nullptr);
    return;
  }
  const at::Tensor s32 = as_float(s), t32 = as_float(t);
  launch(s32, t32, labels_c, coef_c, stats, opts, write_grad ? &s32 : nullptr);
  if (write_grad && !s32.is_same(s)) s.copy_(s32);
}

}  // namespace opsd
