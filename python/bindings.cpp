// opsd_kernels._C: the native row step, as a PyTorch operator (so torch.compile and the
// dispatcher see it), the constants it shares with Python (kind codes, stats columns: checked by
// opsd_kernels/_native.py when it loads), and what env_report needs to know.
//
//   torch.ops.opsd.divergence_rows_native_(s, t, labels, coef, stats, kind, beta, inv_tau_s,
//       inv_tau_t, clip, softcap, ignore_index, write_grad)
//
// Its fake (meta) kernel is registered from Python (opsd_kernels/_native.py): the op returns
// nothing and only writes into s and stats, so the fake does nothing.
#include <optional>
#include <string>

#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/version.h>

#include "../csrc/divergence.h"

namespace {

opsd::RowOptions make_options(int64_t kind, double beta, double inv_tau_s, double inv_tau_t,
                              std::optional<double> clip, std::optional<double> softcap,
                              int64_t ignore_index) {
  TORCH_CHECK(kind >= opsd::kForwardKL && kind <= opsd::kSampled,
              "divergence_rows_native_: unknown kind code ", kind);
  return opsd::RowOptions{
      static_cast<int>(kind),
      static_cast<float>(beta),
      static_cast<float>(inv_tau_s),
      static_cast<float>(inv_tau_t),
      static_cast<float>(clip.value_or(0.0)),
      clip.has_value(),
      static_cast<float>(softcap.value_or(1.0)),
      softcap.has_value(),
      ignore_index,
  };
}

using RowsFn = void (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        const at::Tensor&, const at::Tensor&, const opsd::RowOptions&, bool);

// The operator's signature (the schema below) over one port of the row step.
template <RowsFn ROWS>
void divergence_rows_op(const at::Tensor& s, const at::Tensor& t,
                        const std::optional<at::Tensor>& labels, const at::Tensor& coef,
                        const at::Tensor& stats, int64_t kind, double beta, double inv_tau_s,
                        double inv_tau_t, std::optional<double> clip,
                        std::optional<double> softcap, int64_t ignore_index, bool write_grad) {
  ROWS(s, t, labels, coef, stats,
       make_options(kind, beta, inv_tau_s, inv_tau_t, clip, softcap, ignore_index), write_grad);
}

constexpr bool kHasCuda =
#ifdef OPSD_WITH_CUDA
    true;
#else
    false;
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(opsd, m) {
  // Where torch finds the fake kernel when something traces the op before Python loaded it.
  m.set_python_module("opsd_kernels._native");
  m.def(
      "divergence_rows_native_(Tensor(a!) s, Tensor t, Tensor? labels, Tensor coef, "
      "Tensor(b!) stats, int kind, float beta, float inv_tau_s, float inv_tau_t, float? clip, "
      "float? softcap, int ignore_index, bool write_grad) -> ()");
}

TORCH_LIBRARY_IMPL(opsd, CPU, m) {
  m.impl("divergence_rows_native_", &divergence_rows_op<opsd::divergence_rows_cpu>);
}

#ifdef OPSD_WITH_CUDA
TORCH_LIBRARY_IMPL(opsd, CUDA, m) {
  m.impl("divergence_rows_native_", &divergence_rows_op<opsd::divergence_rows_cuda>);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native kernels of opsd_kernels (see csrc/divergence.h for the row-step contract)";
  m.def("cpu_isa", [] { return std::string(opsd::divergence_rows_cpu_isa()); },
        "Instruction set of the CPU kernel build in use (AVX512, AVX2 or DEFAULT).");
  m.attr("has_cuda") = kHasCuda;
  py::list kind_names, stat_names;
  for (const char* name : opsd::kKindNames) kind_names.append(name);
  for (const char* name : opsd::kStatNames) stat_names.append(name);
  m.attr("kind_names") = py::tuple(kind_names);
  m.attr("stat_names") = py::tuple(stat_names);
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
