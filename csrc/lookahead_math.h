// The per-element math of Lookahead around SGD / Adam / AdamW, written once for every
// compiled backend: the CPU kernels include it as plain C++, the CUDA kernels (next issue)
// as __host__ __device__ functions. Each function repeats the operation order of
// lookahead_fused/reference.py (itself torch.optim's single-tensor path), so that fp32
// results agree with the reference to a few ulps; all math is fp32, whatever the storage
// dtype, and every value is rounded once when stored.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LAF_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define LAF_HD inline __attribute__((always_inline))
#endif

namespace lookahead_fused {

// ---------------------------------------------------------------------------------------
// Storage dtypes. Parameters are fp32, bf16 or fp16; state and slow weights are fp32 or the
// parameter's dtype. Loads widen to fp32, stores round to nearest even and keep NaN a NaN.
// ---------------------------------------------------------------------------------------

// dtype tags; bf16 and fp16 values are stored as raw uint16_t, so that loops over them
// load and store plain integers (GCC does not vectorise loops over 2-byte structs).
struct bf16 {};
struct fp16 {};

template <typename T>
struct raw_type {
  using type = T;
};
template <>
struct raw_type<bf16> {
  using type = uint16_t;
};
template <>
struct raw_type<fp16> {
  using type = uint16_t;
};
template <typename T>
using raw_t = typename raw_type<T>::type;

// The intrinsics exist in device code only; nvcc's host pass takes the memcpy.
LAF_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

LAF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// a * b + c rounded once: how torch computes `c.add(b, alpha=a)` (L2 weight decay
// `grad.add(param, alpha=weight_decay)`), a fused multiply-add in its vectorised CPU kernels and
// on the GPU. Where the gradient nearly cancels the decay term, rounding the product first
// changes the small sum in relative terms, and Adam's first step (|m| / (sqrt(v) + eps) with
// m² ≈ v) passes that on to θ. Hosts without FMA instructions (the x86-64 baseline) form the
// exact product in double and round the sum once more: equal to the fused result except in
// double-rounding ties.
LAF_HD float mul_add(float a, float b, float c) {
#if defined(__CUDACC__)
  return fmaf(a, b, c);
#elif defined(__FMA__)
  return std::fma(a, b, c);
#else
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
#endif
}

// c ? a : b, with no branch for the compiler to keep: for a flag that is fixed for a whole
// loop (a hyperparameter, or whether the parameter takes its first step) and for
// data-dependent picks alike. On the host it is a bit blend. GCC turns a `?:` into a branch
// whenever it can sink the computation of one side into it, and it then refuses to
// if-convert that branch back when the side holds float arithmetic (which "could trap"
// without -fno-trapping-math), so the loop stays scalar ("control flow in loop"); a blend
// uses both sides and leaves nothing to sink. Exactly c ? a : b, bit for bit. On the GPU
// the `?:` is a select instruction.
LAF_HD uint32_t choose_bits(bool c, uint32_t a, uint32_t b) {
#if defined(__CUDACC__)
  return c ? a : b;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
#endif
}

LAF_HD float choose(bool c, float a, float b) {
#if defined(__CUDACC__)
  return c ? a : b;
#else
  return bits_float(choose_bits(c, float_bits(a), float_bits(b)));
#endif
}

template <typename T>
LAF_HD float load(raw_t<T> x);
template <typename T>
LAF_HD raw_t<T> store(float x);

template <>
LAF_HD float load<float>(float x) {
  return x;
}
template <>
LAF_HD float store<float>(float x) {
  return x;
}

template <>
LAF_HD float load<bf16>(uint16_t x) {
  return bits_float(static_cast<uint32_t>(x) << 16);
}
// Round to nearest even, as c10::BFloat16 does; a NaN stays a (quiet) NaN instead of
// rounding into an infinity. Branch-free so that loops over it vectorise.
template <>
LAF_HD uint16_t store<bf16>(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(choose_bits(is_nan, nan, rounded));
}

#if defined(__CUDACC__)
template <>
LAF_HD float load<fp16>(uint16_t x) {
  return __half2float(__ushort_as_half(x));
}
template <>
LAF_HD uint16_t store<fp16>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
#else
// IEEE half conversions in integer and fp32 arithmetic (the FP16 library's algorithm, which
// c10::Half uses on the CPU): round to nearest even, NaN kept a NaN, subnormals exact.
// Plain arithmetic vectorises; GCC turns _Float16 casts into a libgcc call per element
// unless the target has AVX512-FP16.
template <>
LAF_HD float load<fp16>(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = choose_bits(two_w < (1u << 27), float_bits(denormalized), float_bits(normalized));
  return bits_float(sign | magnitude);
}
template <>
LAF_HD uint16_t store<fp16>(float x) {
  const uint32_t w = float_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  // Scaling up then down by powers of two overflows what is too large for fp16 to infinity
  // and leaves the rest exact; adding the bias rounds the mantissa to fp16's 10 bits.
  const float base = bits_float((bias >> 1) + 0x07800000u) + (std::fabs(x) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  // A blend, not `?:`: GCC would sink the float arithmetic above into the non-NaN branch and
  // then keep the branch (see choose_bits).
  return static_cast<uint16_t>((sign >> 16) | choose_bits(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}
#endif

// The value a reader sees after x is stored as T (what the reference reads back when it
// uses a parameter or state entry after writing it).
template <typename T>
LAF_HD float rounded(float x) {
  return load<T>(store<T>(x));
}

LAF_HD float sqrt_f(float x) {
#if defined(__CUDACC__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// torch.lerp's formula, w < 0.5 ? a + w (b − a) : b − (b − a)(1 − w) (exact at both ends),
// written as one multiply-add from a selected base, as ATen's vectorised lerp does: the
// branch on w then becomes a blend, and loops over it vectorise (b − (b − a)(1 − w) equals
// b + (w − 1)(b − a) exactly, negation being exact). The weight is the same for a whole
// loop: LerpWeight holds the branch taken and the factor, computed once before the loop
// (lerp_weight), so that the loop body holds no select on a loop-invariant flag (GCC
// unswitches such loops, runs into its size limit and leaves them scalar on AVX2).
struct LerpWeight {
  bool small;    // w < 0.5: the result is a + w (b − a); else b + (w − 1)(b − a)
  float factor;  // w or w − 1
};

LAF_HD LerpWeight lerp_weight(float w) {
  const bool small = w < 0.5f;
  return LerpWeight{small, choose(small, w, w - 1.0f)};
}

LAF_HD float lerp(float a, float b, const LerpWeight& w) { return choose(w.small, a, b) + w.factor * (b - a); }

LAF_HD float lerp(float a, float b, float w) { return lerp(a, b, lerp_weight(w)); }

// torch.maximum: a NaN in either operand wins (a's first), else the larger one.
LAF_HD float nan_maximum(float a, float b) { return choose(a != a, a, choose(b != b, b, choose(a > b, a, b))); }

// ---------------------------------------------------------------------------------------
// Scalars. Everything a kernel needs besides pointers, in fp32 as the reference's tensor
// ops see them (a Python float meeting an fp32 tensor is rounded to fp32 first).
// ---------------------------------------------------------------------------------------

struct GradScalars {
  float scale;  // GradScaler's grad_scale, 1 without a scaler (a division by 1 is exact)
  float sign;   // -1 under maximize, else 1 (negation is exact, so this is torch's -grad)
};

struct SgdScalars {
  float neg_lr;  // -lr
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  bool has_weight_decay;
  bool nesterov;
};

// Per group; the bias corrections come per parameter (AdamStepScalars) from its own step.
struct AdamScalars {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float decay_factor;  // AdamW: 1 - lr * weight_decay; else exactly 1 (θ·1 = θ, even inf/NaN)
  bool l2;             // Adam with weight_decay != 0: g ← g + wd θ
};

struct AdamStepScalars {
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
};

// The gradient as the inner optimizer sees it: unscaled (GradScaler), sign-flipped under
// maximize. The loops below avoid branches on flags (computing both sides and selecting,
// or multiplying by an exact 1) so that GCC if-converts and vectorises them.
LAF_HD float prepare_grad(float g, const GradScalars& s) { return (g / s.scale) * s.sign; }

// torch.optim.SGD for one element. `first`: the parameter's step is 0, so the momentum
// buffer starts as the gradient itself. Returns nothing; `g` becomes the gradient used
// (after weight decay), as in reference.sgd_update.
template <bool kMomentum>
LAF_HD void sgd_update(float& theta, float& g, float& buf, bool first, const SgdScalars& s) {
  const float g_decayed = mul_add(s.weight_decay, theta, g);
  g = choose(s.has_weight_decay, g_decayed, g);
  float d_p = g;
  if (kMomentum) {
    buf = choose(first, g, buf * s.momentum + s.one_minus_dampening * g);
    d_p = choose(s.nesterov, g + s.momentum * buf, buf);
  }
  theta = theta + s.neg_lr * d_p;
}

// torch.optim.Adam / AdamW for one element; `g` becomes the gradient the moments saw.
// `m_weight` is lerp_weight(s.one_minus_beta1), which a loop computes once before it.
template <bool kAmsgrad>
LAF_HD void adam_update(float& theta, float& g, float& m, float& v, float& v_max, const AdamScalars& s,
                        const AdamStepScalars& t, const LerpWeight& m_weight) {
  const float g_decayed = mul_add(s.weight_decay, theta, g);
  g = choose(s.l2, g_decayed, g);
  theta = theta * s.decay_factor;
  m = lerp(m, g, m_weight);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  float denom;
  if (kAmsgrad) {
    v_max = nan_maximum(v_max, v);
    denom = sqrt_f(v_max) / t.bc2_sqrt + s.eps;
  } else {
    denom = sqrt_f(v) / t.bc2_sqrt + s.eps;
  }
  theta = theta + t.neg_step_size * m / denom;
}

template <bool kAmsgrad>
LAF_HD void adam_update(float& theta, float& g, float& m, float& v, float& v_max, const AdamScalars& s,
                        const AdamStepScalars& t) {
  adam_update<kAmsgrad>(theta, g, m, v, v_max, s, t, lerp_weight(s.one_minus_beta1));
}

// The sync of Algorithm 1: φ ← φ + α(θ − φ) (eq. 1), then θ ← φ. `theta` is the value the
// parameter holds (already rounded to its dtype); returns the new φ in fp32 before rounding.
// `alpha` as lerp_weight(α), computed once per loop, or as α.
LAF_HD float sync_slow(float phi, float theta, const LerpWeight& alpha) { return lerp(phi, theta, alpha); }
LAF_HD float sync_slow(float phi, float theta, float alpha) { return lerp(phi, theta, alpha); }

// inner_state="pullback": m ← α m + (1 − α) m_cached; the caller stores m into the cache too.
LAF_HD float pullback(float m, float m_cached, float alpha, float one_minus_alpha) {
  return m * alpha + one_minus_alpha * m_cached;
}

// Adaptive α (reference.adaptive_alpha): the terms of gᵀd and dᵀÂd for one element, with
// d = φ − θ_k and Â = (sqrt(v / bc2) + eps) / lr; accumulated in double by the caller.
struct AlphaDots {
  double g_dot_d;
  double d_a_d;
};

LAF_HD void alpha_terms(AlphaDots& acc, float g, float phi, float theta, float v, float bc2, float eps, float lr) {
  const float d = phi - theta;
  const float curvature = (sqrt_f(v / bc2) + eps) / lr;
  acc.g_dot_d += static_cast<double>(g) * static_cast<double>(d);
  acc.d_a_d += static_cast<double>(d * curvature) * static_cast<double>(d);
}

}  // namespace lookahead_fused
