// Torch-facing entry points of the CUDA row step beyond the one ../divergence.h declares
// (opsd::divergence_rows_cuda, which writes the gradient over s in s's dtype).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "../divergence.h"

namespace opsd {

// The row step with the gradient in a separate fp32 buffer: grad [C, V] float32 on s's device,
// unit column stride, receives coef_i * d D_i / d z_S (0 on masked rows); s and t are only
// read. The form for bf16 logits whose gradient must stay fp32 until it is scaled.
void divergence_rows_cuda_grad(const at::Tensor& s, const at::Tensor& t,
                               const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                               const at::Tensor& stats, const RowOptions& opts,
                               const at::Tensor& grad);

}  // namespace opsd
