// The per-row divergence step as __host__ __device__ code, shared by the CUDA kernel
// (divergence.cu) and a host harness that runs the same code on the CPU (tests/csrc/).
//
// One "row group" of threads (a warp, or a whole block) processes one row; the group is
// abstracted as a context `Ctx` with rank(), size(), all_sum(float (&)[N]) and
// all_max(float (&)[N]) (every member of the group gets the reduced values, bit-identical).
// The CUDA kernel gives it warp shuffles (+ shared memory across warps); the host harness
// gives it std::threads and a barrier, so the lane partitioning, the vector/scalar split
// and the reductions all run on the CPU exactly as they are written here.
//
// Math (derivation in opsd_kernels/ops/divergence.py, same three passes as the Triton kernel):
//   s = softcap(z_S) / tau_S, t = softcap(z_T) / tau_T, p = softmax(s), q = softmax(t),
//   D = sum_v l_v, g_v = d l_v / d log p_v, d D / d s_j = g_j - p_j S, S = sum_v g_v.
//   pass 1: online log-sum-exp of both roles (per thread, then a (max, sum) combine);
//   pass 2: D, H(p), H(q) and S, only where S has no closed form (reverse KL, JSD, clipping),
//           the top token's share apart (see pass 2 below: confident rows stay accurate; every
//           port sums it apart, opsd_kernels/ops/__init__.py);
//   pass 3: the gradient coef * (d D / d s) * (d s / d z), computed in fp32 and stored as fp32
//           or bf16, and where pass 2 was skipped, D, H(p), H(q).
// Numerics: log p = (s - M) - log Z (never s - lse); every x log x is guarded by x > 0 (0 log 0
// = 0, underflowed mass and -inf logits contribute 0); the JSD mixture is floored at FLT_MIN
// before its log; running maxima start at a finite floor so exp(-inf - floor) = 0, never
// exp(-inf + inf) = NaN. Masked rows (label == ignore_index) are never read: zero stats, zero
// gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../divergence_options.h"

#if defined(__CUDACC__)
#define OPSD_HD __host__ __device__ __forceinline__
#else
#define OPSD_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define OPSD_UNROLL _Pragma("unroll")
#else
#define OPSD_UNROLL
#endif

namespace opsd {
namespace cuda {

constexpr float kFloor = -1.0e30f;          // finite start of every running maximum
constexpr float kTiny = 1.17549435e-38f;    // FLT_MIN: floor of the JSD mixture

// bf16 as its raw bits: converting to fp32 is a 16-bit shift, exact, on host and device alike,
// so this header needs no cuda_bf16.h.
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");

// --- scalar math -------------------------------------------------------------------------------

OPSD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

OPSD_HD float neg_inf() { return bits_to_float(0xff800000u); }

OPSD_HD float to_float(float x) { return x; }
OPSD_HD float to_float(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// The device uses the MUFU approximations (what Triton's tl.exp / tl.log lower to): the kernel
// is memory-bound only if its 2-4 transcendentals per element stay cheap. Their flush of
// subnormal results to 0 is harmless: every x log x is guarded and the mixture is floored.
OPSD_HD float fexp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

OPSD_HD float flog(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return std::log(x);
#endif
}

OPSD_HD float fmax2(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}

// s = softcap(z) / tau and, optionally, d s / d z. tanh(x) = 1 - 2 / (exp(2x) + 1) saturates
// cleanly at +-1 (z = -inf gives -cap / tau, as the Triton kernel and the PyTorch step do).
OPSD_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);  // 0 for |b| > 2^126, inf included: what 2 / (e + 1) needs
#else
  return a / b;
#endif
}

template <bool SOFTCAP>
OPSD_HD float scale_logit(float z, float inv_tau, float cap, float two_over_cap, float* ds_dz) {
  if constexpr (SOFTCAP) {
    const float th = 1.0f - fdiv(2.0f, fexp(z * two_over_cap) + 1.0f);
    if (ds_dz != nullptr) *ds_dz = (1.0f - th * th) * inv_tau;
    return th * (cap * inv_tau);
  } else {
    if (ds_dz != nullptr) *ds_dz = inv_tau;
    return z * inv_tau;
  }
}

OPSD_HD float xlog_ratio(float x, float log_x, float log_y) {
  return x > 0.0f ? x * (log_x - log_y) : 0.0f;
}

OPSD_HD float entropy_term(float x, float log_x) { return x > 0.0f ? -x * log_x : 0.0f; }

// The per-vocab term l_v (clipped) and its weight g_v (0 where clipped); see the header note.
template <int KIND>
OPSD_HD void term_and_weight(float log_p, float log_q, float p, float q, const RowOptions& o,
                             float& term, float& g) {
  if constexpr (KIND == kForwardKL) {
    term = xlog_ratio(q, log_q, log_p);
    g = -q;
  } else if constexpr (KIND == kReverseKL) {
    term = xlog_ratio(p, log_p, log_q);
    g = p > 0.0f ? p * (log_p - log_q + 1.0f) : 0.0f;
  } else {
    // m >= beta q and m >= (1 - beta) p: log m is accurate wherever a term is not guarded;
    // the floor keeps a subnormal p from meeting m = 0.
    const float log_m = flog(fmax2(o.beta * q + (1.0f - o.beta) * p, kTiny));
    const float p_log_pm = xlog_ratio(p, log_p, log_m);
    term = o.beta * xlog_ratio(q, log_q, log_m) + (1.0f - o.beta) * p_log_pm;
    g = (1.0f - o.beta) * p_log_pm;
  }
  if (o.has_clip) {
    const bool kept = term < o.clip;
    term = kept ? term : o.clip;
    g = kept ? g : 0.0f;
  }
}

// --- vector loads and stores -------------------------------------------------------------------

// N elements of T from an address aligned to N * sizeof(T) bytes (16 or 8 or 4 bytes): one
// vector load on the device. READONLY rows (the teacher) go through the read-only cache.
template <bool READONLY, class T, int N>
OPSD_HD void load_pack(const T* p, float (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kWords = kBytes / 4;
  static_assert(kBytes == 16 || kBytes == 8 || kBytes == 4, "pack must be 4, 8 or 16 bytes");
  uint32_t w[kWords];
#if defined(__CUDA_ARCH__)
  if constexpr (kWords == 4) {
    const uint4 v = READONLY ? __ldg(reinterpret_cast<const uint4*>(p))
                             : *reinterpret_cast<const uint4*>(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (kWords == 2) {
    const uint2 v = READONLY ? __ldg(reinterpret_cast<const uint2*>(p))
                             : *reinterpret_cast<const uint2*>(p);
    w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = READONLY ? __ldg(reinterpret_cast<const unsigned int*>(p))
                    : *reinterpret_cast<const unsigned int*>(p);
  }
#else
  std::memcpy(w, p, kBytes);
#endif
  if constexpr (std::is_same_v<T, float>) {
OPSD_UNROLL
    for (int i = 0; i < N; ++i) out[i] = bits_to_float(w[i]);
  } else {
    static_assert(std::is_same_v<T, bf16>, "rows are fp32 or bf16");
OPSD_UNROLL
    for (int i = 0; i < kWords; ++i) {  // little-endian: the low half is the lower column
      out[2 * i] = bits_to_float(w[i] << 16);
      out[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    }
  }
}

// fp32 -> bf16 bits, round to nearest even (NaN stays NaN): what torch's BFloat16 does.
OPSD_HD uint32_t bf16_bits(float x) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof u);
#endif
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Where a gradient row goes: fp32, or bf16 rounded to nearest even (over bf16 logits, in place),
// or nowhere (both null).
struct GradRow {
  float* f32 = nullptr;
  bf16* b16 = nullptr;
  OPSD_HD bool any() const { return f32 != nullptr || b16 != nullptr; }
  OPSD_HD GradRow offset(int64_t c) const {
    return {f32 == nullptr ? nullptr : f32 + c, b16 == nullptr ? nullptr : b16 + c};
  }
  OPSD_HD void store(int64_t c, float v) const {
    if (f32 != nullptr) {
      f32[c] = v;
    } else {
      b16[c].bits = static_cast<uint16_t>(bf16_bits(v));
    }
  }
};

// N gradient values to an aligned address (fp32: 16 bytes, N a multiple of 4; bf16: 2N bytes,
// N in {2, 4, 8}): float4 / one 4-, 8- or 16-byte store.
template <int N>
OPSD_HD void store_pack(const GradRow& g, int64_t c, const float (&v)[N]) {
  if (g.f32 != nullptr) {
    static_assert(N % 4 == 0, "fp32 gradient packs are whole float4s");
#if defined(__CUDA_ARCH__)
OPSD_UNROLL
    for (int i = 0; i < N; i += 4) {
      *reinterpret_cast<float4*>(g.f32 + c + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
#else
    std::memcpy(g.f32 + c, v, sizeof v);
#endif
    return;
  }
  constexpr int kWords = N / 2;
  static_assert(kWords == 1 || kWords == 2 || kWords == 4, "bf16 packs are 4, 8 or 16 bytes");
  uint32_t w[kWords];
OPSD_UNROLL
  for (int i = 0; i < kWords; ++i) w[i] = bf16_bits(v[2 * i]) | (bf16_bits(v[2 * i + 1]) << 16);
#if defined(__CUDA_ARCH__)
  if constexpr (kWords == 4) {
    *reinterpret_cast<uint4*>(g.b16 + c) = make_uint4(w[0], w[1], w[2], w[3]);
  } else if constexpr (kWords == 2) {
    *reinterpret_cast<uint2*>(g.b16 + c) = make_uint2(w[0], w[1]);
  } else {
    *reinterpret_cast<unsigned int*>(g.b16 + c) = w[0];
  }
#else
  std::memcpy(g.b16 + c, w, sizeof w);
#endif
}

template <class T>
OPSD_HD bool aligned_to(const T* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The first column at which every row pointer is pack-aligned, or V when there is none (rows of
// different alignment phases, e.g. a gradient buffer offset from the logits: the row runs
// scalar, correct but slower).
template <int VEC, class TS, class TT>
OPSD_HD int64_t vector_head(const TS* s, const TT* t, const GradRow& g, int64_t V) {
  for (int h = 0; h < VEC && h < V; ++h) {
    if (aligned_to(s + h, VEC * sizeof(TS)) && aligned_to(t + h, VEC * sizeof(TT)) &&
        (g.f32 == nullptr || aligned_to(g.f32 + h, 16)) &&
        (g.b16 == nullptr || aligned_to(g.b16 + h, VEC * sizeof(bf16)))) {
      return h;
    }
  }
  return V;
}

// --- one sweep over a row ----------------------------------------------------------------------

// Calls f(zs, zt, col0, out) on packs of raw values (float[N]: N = VEC for aligned vectors, 1
// for the scalar head and tail); with `store`, out[] goes to g at the same columns.
// Vector j belongs to lane j % size; UNROLL vectors are loaded before any is used.
template <int VEC, int UNROLL, class Ctx, class TS, class TT, class F>
OPSD_HD void sweep(const Ctx& ctx, const TS* s, const TT* t, const GradRow& g, int64_t V,
                   int64_t head, bool store, F&& f) {
  const int64_t lane = ctx.rank();
  const int64_t T = ctx.size();
  const int64_t nvec = (V - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  auto scalar = [&](int64_t c) {
    float zs[1] = {to_float(s[c])};
    float zt[1] = {to_float(t[c])};
    float out[1] = {0.0f};
    f(zs, zt, c, out);
    if (store) g.store(c, out[0]);
  };
  for (int64_t c = lane; c < head; c += T) scalar(c);

  const TS* sv = s + head;
  const TT* tv = t + head;
  const GradRow gv = g.offset(head);
  int64_t k = lane;
  for (; k + (UNROLL - 1) * T < nvec; k += UNROLL * T) {
    float zs[UNROLL][VEC], zt[UNROLL][VEC];
OPSD_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      load_pack<false>(sv + (k + u * T) * VEC, zs[u]);
      load_pack<true>(tv + (k + u * T) * VEC, zt[u]);
    }
OPSD_UNROLL
    for (int u = 0; u < UNROLL; ++u) {
      float out[VEC] = {};
      const int64_t col = (k + u * T) * VEC;
      f(zs[u], zt[u], head + col, out);
      if (store) store_pack(gv, col, out);
    }
  }
  for (; k < nvec; k += T) {
    float zs[VEC], zt[VEC], out[VEC] = {};
    load_pack<false>(sv + k * VEC, zs);
    load_pack<true>(tv + k * VEC, zt);
    f(zs, zt, head + k * VEC, out);
    if (store) store_pack(gv, k * VEC, out);
  }

  for (int64_t c = tail + lane; c < V; c += T) scalar(c);
}

// Elements in a pack argument (float[N]) of a sweep functor. A variable template: usable in
// device code without --expt-relaxed-constexpr.
template <class A>
constexpr int kPackSize = static_cast<int>(std::extent_v<std::remove_reference_t<A>>);

// --- the row step ------------------------------------------------------------------------------

// One row: s, t raw logits (V values, unit stride); g the gradient row (fp32, or bf16; it may
// alias s when of s's dtype; none: no gradient is written); label: the row's label when
// has_label; stats: kNumStats floats. Every member of the group calls this with the same
// arguments.
template <int KIND, bool SOFTCAP, int VEC, int UNROLL, class Ctx, class TS, class TT>
OPSD_HD void divergence_row(const Ctx& ctx, const RowOptions& o, const TS* s, const TT* t,
                            const GradRow& g, int64_t V, bool has_label, int64_t label,
                            float coef, float* stats) {
  const bool write_grad = g.any();
  if (has_label && label == o.ignore_index) {
    if (ctx.rank() == 0) {
      for (int i = 0; i < kNumStats; ++i) stats[i] = 0.0f;
    }
    if (write_grad) {
      for (int64_t c = ctx.rank(); c < V; c += ctx.size()) g.store(c, 0.0f);
    }
    return;
  }
  const float cap = o.softcap;
  const float two_over_cap = SOFTCAP ? 2.0f / cap : 0.0f;
  auto scale_s = [&](float z, float* ds_dz) {
    return scale_logit<SOFTCAP>(z, o.inv_tau_s, cap, two_over_cap, ds_dz);
  };
  auto scale_t = [&](float z) {
    return scale_logit<SOFTCAP>(z, o.inv_tau_t, cap, two_over_cap, nullptr);
  };

  // The label's logits, read before anything is written over the student row.
  const bool label_in_row = has_label && label >= 0 && label < V;
  const float zs_y = label_in_row ? to_float(s[label]) : 0.0f;
  const float zt_y = label_in_row ? to_float(t[label]) : 0.0f;
  const int64_t head = vector_head<VEC>(s, t, g, V);

  // Pass 1: online log-sum-exp of both roles, per thread, rescaled once per pack.
  float m_s = kFloor, z_s = 0.0f, m_t = kFloor, z_t = 0.0f;
  sweep<VEC, UNROLL>(ctx, s, t, g, V, head, false,
                     [&](const auto& zs, const auto& zt, int64_t, auto&) {
    constexpr int N = kPackSize<decltype(zs)>;
    float xs[N], xt[N];
    float ms = kFloor, mt = kFloor;
OPSD_UNROLL
    for (int i = 0; i < N; ++i) {
      xs[i] = scale_s(zs[i], nullptr);
      xt[i] = scale_t(zt[i]);
      ms = fmax2(ms, xs[i]);
      mt = fmax2(mt, xt[i]);
    }
    if (ms > m_s) {
      z_s *= fexp(m_s - ms);
      m_s = ms;
    }
    if (mt > m_t) {
      z_t *= fexp(m_t - mt);
      m_t = mt;
    }
OPSD_UNROLL
    for (int i = 0; i < N; ++i) {
      z_s += fexp(xs[i] - m_s);
      z_t += fexp(xt[i] - m_t);
    }
  });
  float mx[2] = {m_s, m_t};
  ctx.all_max(mx);
  float zz[2] = {z_s * fexp(m_s - mx[0]), z_t * fexp(m_t - mx[1])};
  ctx.all_sum(zz);
  const float max_s = mx[0], max_t = mx[1];
  const float log_z_s = flog(zz[0]), log_z_t = flog(zz[1]);

  float logp_y = 0.0f, logq_y = 0.0f;
  if (has_label) {
    const float sy = label_in_row ? scale_s(zs_y, nullptr) : neg_inf();
    const float ty = label_in_row ? scale_t(zt_y) : neg_inf();
    logp_y = (sy - max_s) - log_z_s;
    logq_y = (ty - max_t) - log_z_t;
  }
  const float advantage = logq_y - logp_y;
  const int64_t onehot = label_in_row ? label : -1;

  // Pass 2, only where S = sum_v g_v has no closed form: D, H(p), H(q), S.
  // The top token (s_v == max s, when unique) is summed apart: its gradient
  // g_top - p_top S = g_top (1 - p_top) - p_top G_rest is taken with 1 - p_top = P_rest, the
  // sum of the other p_v. On a confident row (p_top = 1 - 1e-5) both products are small
  // differences of large numbers in the plain form and lose most of their digits (2-5x the
  // error of fp32 autograd); with P_rest and G_rest nothing cancels.
  const bool needs_s = KIND != kSampled && (KIND != kForwardKL || o.has_clip);
  float loss = 0.0f, h_p = 0.0f, h_q = 0.0f, g_sum = -1.0f;  // forward KL: S = -sum q = -1
  float g_rest = 0.0f, p_rest = 0.0f;
  bool unique_top = false;
  if (needs_s) {
    // loss, G_rest, g_top, P_rest, number of tops, H(p), H(q)
    float acc[7] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    sweep<VEC, UNROLL>(ctx, s, t, g, V, head, false,
                       [&](const auto& zs, const auto& zt, int64_t, auto&) {
      constexpr int N = kPackSize<decltype(zs)>;
OPSD_UNROLL
      for (int i = 0; i < N; ++i) {
        const float x = scale_s(zs[i], nullptr);
        const float log_p = (x - max_s) - log_z_s;
        const float log_q = (scale_t(zt[i]) - max_t) - log_z_t;
        const float p = fexp(log_p), q = fexp(log_q);
        float term, w;
        term_and_weight<KIND>(log_p, log_q, p, q, o, term, w);
        const bool top = x == max_s;
        acc[0] += term;
        acc[1] += top ? 0.0f : w;
        acc[2] += top ? w : 0.0f;
        acc[3] += top ? 0.0f : p;
        acc[4] += top ? 1.0f : 0.0f;
        acc[5] += entropy_term(p, log_p);
        acc[6] += entropy_term(q, log_q);
      }
    });
    ctx.all_sum(acc);
    loss = acc[0];
    g_rest = acc[1];
    g_sum = acc[1] + acc[2];
    p_rest = acc[3];
    unique_top = acc[4] == 1.0f;
    h_p = acc[5];
    h_q = acc[6];
  }

  // Pass 3: the gradient, and where pass 2 was skipped, D, H(p), H(q).
  if (write_grad || !needs_s) {
    float acc[3] = {0.0f, 0.0f, 0.0f};
    sweep<VEC, UNROLL>(ctx, s, t, g, V, head, write_grad,
                       [&](const auto& zs, const auto& zt, int64_t col0, auto& out) {
      constexpr int N = kPackSize<decltype(zs)>;
OPSD_UNROLL
      for (int i = 0; i < N; ++i) {
        float ds_dz;
        const float x = scale_s(zs[i], &ds_dz);
        const float log_p = (x - max_s) - log_z_s;
        const float log_q = (scale_t(zt[i]) - max_t) - log_z_t;
        const float p = fexp(log_p), q = fexp(log_q);
        float grad;
        if constexpr (KIND == kSampled) {
          grad = advantage * (p - (col0 + i == onehot ? 1.0f : 0.0f));
        } else {
          float term, w;
          term_and_weight<KIND>(log_p, log_q, p, q, o, term, w);
          grad = unique_top && x == max_s ? w * p_rest - p * g_rest : w - p * g_sum;
          if (!needs_s) acc[0] += term;
        }
        if (!needs_s) {
          acc[1] += entropy_term(p, log_p);
          acc[2] += entropy_term(q, log_q);
        }
        out[i] = grad * ds_dz * coef;
      }
    });
    if (!needs_s) {
      ctx.all_sum(acc);
      loss = acc[0];
      h_p = acc[1];
      h_q = acc[2];
    }
  }
  if constexpr (KIND == kSampled) loss = -advantage * logp_y;

  if (ctx.rank() == 0) {
    stats[kStatDivergence] = loss;
    stats[kStatStudentEntropy] = h_p;
    stats[kStatTeacherEntropy] = h_q;
    stats[kStatStudentLse] = max_s + log_z_s;
    stats[kStatTeacherLse] = max_t + log_z_t;
    stats[kStatStudentLogprob] = logp_y;
    stats[kStatTeacherLogprob] = logq_y;
  }
}

}  // namespace cuda
}  // namespace opsd
