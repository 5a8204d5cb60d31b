// CPU row kernel of the fused divergence: the port of opsd_kernels/ops/divergence.py (math,
// gradient derivation and numerics are in that file's docstring; names follow it: g_v, S,
// NEEDS_S). Compiled once per instruction set (CMakeLists.txt sets CPU_CAPABILITY and its
// flags); divergence.cpp owns the threads and picks the build for this CPU.
//
// One row at a time, in a thread's fp32 scratch (x: student, y: teacher, padded with -inf to
// whole vectors, so every loop runs on full vectors and padding contributes exact zeros):
//   load     x = softcap(s) / tau, y likewise; row maxima          (no exp without softcap)
//   norm     Z_s = sum e^{x - M_s}, Z_t likewise                    (2 exp / column)
//   stats    only where S = sum_v g_v has no closed form (reverse KL, JSD, clipping): terms,
//            entropies, S; g_v and p_v kept in y and w              (2 exp [+1 log] / column)
//   grad     c (g_v - p_v S) into s; where S is known (forward KL: S = -1, sampled) this pass
//            also computes the stats, from p and q                  (2 exp / column)
// c = coef * d s / d z. Sums accumulate in fp32 lanes, flushed into a double every kFlush
// vectors, so long rows do not lose the small terms.
#include "divergence_kernel.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (see CMakeLists.txt)"
#endif

namespace opsd::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
static_assert(kPad % kW == 0, "scratch padding must hold whole vectors");

// A finite floor for the row maxima: e^{-inf - floor} = 0 where e^{-inf - -inf} would be NaN.
constexpr float kFloor = -1.0e30f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kFlush = 64;

struct Sum {
  Vec lanes{0.f};
  int pending = 0;
  double total = 0.0;
  void add(const Vec& v) {
    lanes = lanes + v;
    if (++pending == kFlush) flush();
  }
  void flush() {
    float buf[kW];
    lanes.store(buf);
    for (int64_t i = 0; i < kW; ++i) total += buf[i];
    lanes = Vec(0.f);
    pending = 0;
  }
  float value() {
    flush();
    return static_cast<float>(total);
  }
};

float hmax(const Vec& v) {
  float buf[kW];
  v.store(buf);
  float m = buf[0];
  for (int64_t i = 1; i < kW; ++i) m = std::isnan(buf[i]) ? buf[i] : std::max(m, buf[i]);
  return m;
}

// x where x > 0 holds, else 0: every x log x term is guarded, so underflowed mass (and -inf
// logits, and the padding) contributes 0, never 0 * -inf = NaN.
inline Vec where_pos(const Vec& x, const Vec& v) {
  return Vec::blendv(Vec(0.f), v, x > Vec(0.f));
}

// Scaled logits of one role into dst [padded to whole vectors with -inf]; returns the maximum.
template <typename T>
float load_scaled(const T* src, float* dst, int64_t vocab, float inv_tau, const RowOptions& o) {
  const float* z = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    z = src;
  } else {
    at::vec::convert(src, dst, vocab);  // bf16 -> fp32, then scaled in place
    z = dst;
  }
  const Vec v_inv_tau(inv_tau), v_cap(o.softcap), v_cap_tau(o.softcap * inv_tau);
  auto scale = [&](const Vec& zv) {
    return o.has_softcap ? (zv / v_cap).tanh() * v_cap_tau : zv * v_inv_tau;
  };
  Vec vmax(kFloor);
  int64_t i = 0;
  for (; i + kW <= vocab; i += kW) {
    const Vec xv = scale(Vec::loadu(z + i));
    xv.store(dst + i);
    vmax = at::vec::maximum(vmax, xv);
  }
  if (i < vocab) {
    scale(Vec::loadu(z + i, vocab - i)).store(dst + i, vocab - i);
    std::fill(dst + vocab, dst + i + kW, kNegInf);
    vmax = at::vec::maximum(vmax, Vec::loadu(dst + i));
  }
  return hmax(vmax);
}

// Per-vocab terms l_v (clipped) and weights g_v = d l_v / d log p_v (ops/divergence.py).
template <int KIND, bool CLIP>
inline void terms_and_weights(const Vec& lp, const Vec& lq, const Vec& p, const Vec& q,
                              const Vec& beta, const Vec& one_m_beta, const Vec& clip,
                              Vec& terms, Vec& g) {
  if constexpr (KIND == kForwardKL) {
    terms = where_pos(q, q * (lq - lp));
    g = Vec(0.f) - q;
  } else if constexpr (KIND == kReverseKL) {
    const Vec r = lp - lq;
    terms = where_pos(p, p * r);
    g = where_pos(p, p * (r + Vec(1.f)));
  } else {  // JSD; m >= beta q and m >= (1 - beta) p, floored at FLT_MIN (a subnormal p > 0
            // can meet an m that rounded to 0)
    const Vec lm = at::vec::maximum(at::vec::fmadd(beta, q, one_m_beta * p), Vec(FLT_MIN)).log();
    const Vec p_log_pm = where_pos(p, p * (lp - lm));
    terms = at::vec::fmadd(beta, where_pos(q, q * (lq - lm)), one_m_beta * p_log_pm);
    g = one_m_beta * p_log_pm;
  }
  if constexpr (CLIP) {
    const Vec kept = terms < clip;
    terms = Vec::blendv(clip, terms, kept);
    g = Vec::blendv(Vec(0.f), g, kept);
  }
}

// c = coef * d s / d z: with soft-capping (1 - tanh^2) / tau, tanh recovered from x.
struct GradScale {
  bool softcap;
  Vec c, inv_cap_tau;
  Vec operator()(const Vec& x) const {
    if (!softcap) return c;
    const Vec th = x * inv_cap_tau;
    return c * (Vec(1.f) - th * th);
  }
  float at(float x) const {
    float out[kW];
    (*this)(Vec(x)).store(out);
    return out[0];
  }
};

// Store the first `n` columns of a vector at out + i (the row may end inside it).
inline void store_cols(const Vec& v, float* out, int64_t i, int64_t vocab) {
  if (i + kW <= vocab) {
    v.store(out + i);
  } else {
    v.store(out + i, vocab - i);
  }
}

struct Row {
  float* x;
  float* y;
  float* w;       // a third scratch row (p between the stats and gradient passes)
  int64_t vocab;
  float m_s, m_t;
  int64_t label;  // -1: no labels
  float coef;
  float* out;     // gradient destination (the s row, or x), or nullptr without write_grad
  float* stats;
};

template <int KIND, bool CLIP>
void divergence_row(const Row& r, const RowOptions& o) {
  constexpr bool kNeedsS = KIND == kReverseKL || KIND == kJSD || CLIP;
  const int64_t vw = (r.vocab + kW - 1) / kW * kW;
  float* x = r.x;
  float* y = r.y;
  const Vec vm_s(r.m_s), vm_t(r.m_t);

  Sum z_s, z_t;
  for (int64_t i = 0; i < vw; i += kW) {
    z_s.add((Vec::loadu(x + i) - vm_s).exp());
    z_t.add((Vec::loadu(y + i) - vm_t).exp());
  }
  // log p = (s - M) - log Z, never s - (M + log Z): the sum would round at the size of the
  // logits, which is all of log p for a confident row at large |z| or a tiny temperature.
  const float lz_s = std::log(z_s.value()), lz_t = std::log(z_t.value());
  const Vec vlz_s(lz_s), vlz_t(lz_t);
  float logp_y = 0.f, logq_y = 0.f;
  if (r.label >= 0) {
    logp_y = (x[r.label] - r.m_s) - lz_s;
    logq_y = (y[r.label] - r.m_t) - lz_t;
  }
  const float advantage = logq_y - logp_y;

  const Vec beta(o.beta), one_m_beta(1.f - o.beta), clip(o.clip), vadv(advantage);
  const GradScale scale{o.has_softcap, Vec(r.coef * o.inv_tau_s),
                        Vec(1.f / (o.softcap * o.inv_tau_s))};
  Sum loss, plogp, qlogq;
  if constexpr (kNeedsS) {
    // The top token (x_v == M_s, when unique) is summed apart: its gradient g_top - p_top S is
    // taken as g_top P_rest - p_top G_rest (sums over the other tokens), which on a confident
    // row (p_top = 1 - 1e-5) does not subtract nearly equal numbers (as every port does).
    Sum g_rest, g_top, p_rest, n_top;
    const Vec zero(0.f), one(1.f);
    for (int64_t i = 0; i < vw; i += kW) {
      const Vec xv = Vec::loadu(x + i), yv = Vec::loadu(y + i);
      const Vec lp = (xv - vm_s) - vlz_s, lq = (yv - vm_t) - vlz_t;
      const Vec p = lp.exp(), q = lq.exp();
      Vec terms, g;
      terms_and_weights<KIND, CLIP>(lp, lq, p, q, beta, one_m_beta, clip, terms, g);
      const Vec top = xv == vm_s;
      loss.add(terms);
      g_rest.add(Vec::blendv(g, zero, top));
      g_top.add(Vec::blendv(zero, g, top));
      p_rest.add(Vec::blendv(p, zero, top));
      n_top.add(Vec::blendv(zero, one, top));
      plogp.add(where_pos(p, p * lp));
      qlogq.add(where_pos(q, q * lq));
      if (r.out != nullptr) {  // d D / d s_v = g_v - p_v S, once S is known
        g.store(y + i);
        p.store(r.w + i);
      }
    }
    const float rest = g_rest.value();
    const Vec s_total(rest + g_top.value());
    if (r.out != nullptr) {
      // The top column and its scale, before the gradient may overwrite x (out may alias x).
      int64_t top_col = -1;
      if (n_top.value() == 1.f) {
        top_col = std::find(x, x + r.vocab, r.m_s) - x;
      }
      const float c_top = top_col >= 0 ? scale.at(x[top_col]) : 0.f;
      for (int64_t i = 0; i < vw; i += kW) {
        // Difference first, then the scale: a one-hot row (p_v = 1, S = g_v) gives exactly 0.
        const Vec grad = at::vec::fnmadd(Vec::loadu(r.w + i), s_total, Vec::loadu(y + i));
        store_cols(grad * scale(Vec::loadu(x + i)), r.out, i, r.vocab);
      }
      if (top_col >= 0) {
        r.out[top_col] = (y[top_col] * p_rest.value() - r.w[top_col] * rest) * c_top;
      }
    }
  } else {
    // The label's scale before x can be overwritten (out may alias x).
    const float c_label = r.label >= 0 ? scale.at(x[r.label]) : 0.f;
    for (int64_t i = 0; i < vw; i += kW) {
      const Vec xv = Vec::loadu(x + i), yv = Vec::loadu(y + i);
      const Vec lp = (xv - vm_s) - vlz_s, lq = (yv - vm_t) - vlz_t;
      const Vec p = lp.exp(), q = lq.exp();
      plogp.add(where_pos(p, p * lp));
      qlogq.add(where_pos(q, q * lq));
      Vec grad;
      if constexpr (KIND == kForwardKL) {  // g = -q, S = -1
        loss.add(where_pos(q, q * (lq - lp)));
        grad = p - q;
      } else {  // sampled: d D / d s_j = a (p_j - [j = y]); the label column is fixed below
        grad = vadv * p;
      }
      if (r.out != nullptr) store_cols(scale(xv) * grad, r.out, i, r.vocab);
    }
    if (KIND == kSampled && r.out != nullptr && r.label >= 0) {
      // a (p_y - 1) c, with p_y - 1 formed before any product (exact for p_y near 1).
      r.out[r.label] = advantage * (std::exp(logp_y) - 1.f) * c_label;
    }
  }

  float* st = r.stats;
  st[kStatDivergence] = KIND == kSampled ? -advantage * logp_y : loss.value();
  st[kStatStudentEntropy] = -plogp.value();
  st[kStatTeacherEntropy] = -qlogq.value();
  st[kStatStudentLse] = r.m_s + lz_s;
  st[kStatTeacherLse] = r.m_t + lz_t;
  st[kStatStudentLogprob] = logp_y;
  st[kStatTeacherLogprob] = logq_y;
}

using RowFn = void (*)(const Row&, const RowOptions&);

RowFn row_fn(const RowOptions& o) {
  switch (o.kind) {
    case kForwardKL:
      return o.has_clip ? divergence_row<kForwardKL, true> : divergence_row<kForwardKL, false>;
    case kReverseKL:
      return o.has_clip ? divergence_row<kReverseKL, true> : divergence_row<kReverseKL, false>;
    case kJSD:
      return o.has_clip ? divergence_row<kJSD, true> : divergence_row<kJSD, false>;
    default:  // kSampled; clipping is rejected for it on the host
      return divergence_row<kSampled, false>;
  }
}

template <typename TS, typename TT>
void rows_typed(const RowBlock& b, const RowOptions& o, bool write_grad, int64_t begin,
                int64_t end, float* scratch) {
  const int64_t vocab = b.vocab;
  float* x = scratch;
  float* y = scratch + padded(vocab);
  float* w = scratch + 2 * padded(vocab);
  const RowFn fn = row_fn(o);
  for (int64_t r = begin; r < end; ++r) {
    TS* s_row = static_cast<TS*>(b.s) + r * b.s_stride;
    const TT* t_row = static_cast<const TT*>(b.t) + r * b.t_stride;
    float* st = b.stats + r * b.stats_stride;
    int64_t label = -1;
    if (b.labels != nullptr) {
      label = b.labels[r];
      if (label == o.ignore_index) {  // masked: never read the logits (they may be inf / NaN)
        std::fill(st, st + kNumStats, 0.f);
        if (write_grad) std::fill(s_row, s_row + vocab, TS(0.f));
        continue;
      }
    }
    Row row{x, y, w, vocab, 0.f, 0.f, label, b.coef[r], nullptr, st};
    row.m_s = load_scaled(s_row, x, vocab, o.inv_tau_s, o);
    row.m_t = load_scaled(t_row, y, vocab, o.inv_tau_t, o);
    if (write_grad) {
      // fp32 rows take the gradient directly; bf16 rows get it rounded once, from x.
      if constexpr (std::is_same_v<TS, float>) {
        row.out = s_row;
      } else {
        row.out = x;
      }
    }
    fn(row, o);
    if constexpr (!std::is_same_v<TS, float>) {
      if (write_grad) at::vec::convert(x, s_row, vocab);
    }
  }
}

}  // namespace

void divergence_rows(const RowBlock& block, const RowOptions& opts, bool write_grad,
                     int64_t begin, int64_t end, float* scratch) {
  using BF16 = c10::BFloat16;
  const bool s_f32 = block.s_dtype == Dtype::kFloat, t_f32 = block.t_dtype == Dtype::kFloat;
  if (s_f32 && t_f32) {
    rows_typed<float, float>(block, opts, write_grad, begin, end, scratch);
  } else if (s_f32) {
    rows_typed<float, BF16>(block, opts, write_grad, begin, end, scratch);
  } else if (t_f32) {
    rows_typed<BF16, float>(block, opts, write_grad, begin, end, scratch);
  } else {
    rows_typed<BF16, BF16>(block, opts, write_grad, begin, end, scratch);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace opsd::cpu
