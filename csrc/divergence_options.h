// The facts every port of the per-row divergence step shares, defined once for C++ and CUDA:
// the kind codes, the stats columns and the row options. Their Python definitions
// (opsd_kernels/divergence_options.py KIND_NAMES, opsd_kernels/types.py DivergenceStats) are
// checked against the names exported from here (python/bindings.cpp) when opsd_kernels._C loads.
// Plain C++ with no includes beyond <cstdint>: the per-ISA CPU kernel files, the CUDA kernel and
// the host harness of tests/csrc/ all include it.
#pragma once

#include <cstdint>

namespace opsd {

// Divergence codes, in the order of KIND_NAMES.
enum Kind : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSampled = 3, kNumKinds = 4 };
inline constexpr const char* kKindNames[kNumKinds] = {"forward_kl", "reverse_kl", "jsd",
                                                      "sampled"};

// Columns of the stats rows [C, kNumStats] fp32, in the order of DivergenceStats' fields.
enum StatColumn : int {
  kStatDivergence = 0,
  kStatStudentEntropy = 1,
  kStatTeacherEntropy = 2,
  kStatStudentLse = 3,
  kStatTeacherLse = 4,
  kStatStudentLogprob = 5,  // log p(label), 0 without labels
  kStatTeacherLogprob = 6,  // log q(label), 0 without labels
  kNumStats = 7,
};
inline constexpr const char* kStatNames[kNumStats] = {
    "divergence",  "student_entropy", "teacher_entropy", "student_lse",
    "teacher_lse", "student_logprob", "teacher_logprob"};

// Scalar options, normalised on the host (opsd_kernels.divergence_options.RowOptions): "jsd"
// with beta 0 or 1 arrives as kForwardKL / kReverseKL, so kernels never special-case beta.
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
