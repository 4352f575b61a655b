// Fused Lookahead steps on the CPU: one pass per bucket per step over its segment table.
//
// The bucket's elements are treated as one concatenation (parameter i occupies
// [offset_i, offset_i + numel_i) of the flat state buffers) and cut into fixed-size chunks
// that OpenMP threads take statically, so 467 tensors of very different sizes balance as
// well as one big tensor. A chunk may span several parameters; each piece of it runs one
// tight loop that GCC vectorises (-O3 -fno-math-errno, see CMakeLists.txt).
//
// Every variant is an instantiation of one loop body (`walk_piece`): the optimizer, the
// phase (plain / sync / adaptive-α passes), whether the momentum buffer or amsgrad maximum
// exists, and the three storage dtypes are template parameters. Flags that do not change
// the memory traffic (nesterov, maximize, weight decay, dampening) stay runtime values,
// written as selects in lookahead_math.h so that the loops stay branch-free; the
// inner-state policy of a sync (reset, pullback) is a short loop after the main one.
//
// The file is compiled once per ISA level (CMakeLists.txt), each time with its own -march= and
// LAF_CPU_NS, the namespace of that build; the build of the lowest level also defines
// LAF_CPU_PRIMARY and holds the dispatcher (the end of this file), which runs the highest
// level the CPU supports. Compiled alone (`g++ -c csrc/cpu_kernels.cpp`) it is one level with
// its own dispatcher.
#ifndef LAF_CPU_NS
#define LAF_CPU_NS single
#define LAF_CPU_PRIMARY 1
#endif
#include "cpu_kernels.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "lookahead_math.h"
#include "variant_dispatch.h"

namespace lookahead_fused::cpu::LAF_CPU_NS {
namespace {

// Per-parameter scalars, computed serially before the parallel walk from the parameter's
// own step count (as torch.optim computes them per parameter, in double, then rounded to fp32).
struct SegmentScalars {
  bool first;  // SGD: the step was 0, the momentum buffer starts as the gradient
  AdamStepScalars adam;
  float bc2;  // 1 - beta2^step, for adaptive α's curvature
};

struct Context {
  const Segment* segs;
  const SegmentScalars* seg_scalars;
  GradScalars grad;
  SgdScalars sgd;
  AdamScalars adam;
  InnerState inner_state;
  float alpha, one_minus_alpha, lr, eps;
  void* momentum;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* cached_momentum;
  void* slow;
};

// One piece [begin, end) of parameter `s` (local indices): one loop with no branches and
// no conditional memory access, so that it vectorises.
//   kInner: the inner update (the parameter has a gradient and the phase is not kSyncOnly);
//   kSync:  the sync follows in the same pass; kDots: accumulate adaptive α's terms.
//   kHasM:  SGD with momentum or Adam (a momentum / exp_avg buffer exists); kAdamKind: the
//   second moment exists too; kAmsgrad: and its maximum.
// The inner-state policy of a sync runs after the loop over the same piece, which is still
// in cache (a chunk is 64 Ki elements), so memory sees one pass either way.
template <bool kAdamKind, bool kHasM, bool kAmsgrad, bool kInner, bool kSync, bool kDots, typename P, typename S,
          typename F>
void walk_piece(const Context& c, int64_t s, int64_t begin, int64_t end, AlphaDots& dots) {
  const Segment& seg = c.segs[s];
  const SegmentScalars& ss = c.seg_scalars[s];
  const int64_t base = seg.offset;
  raw_t<P>* __restrict p = reinterpret_cast<raw_t<P>*>(seg.param);
  const raw_t<P>* __restrict g_in = reinterpret_cast<const raw_t<P>*>(seg.grad);
  raw_t<S>* __restrict m_buf = static_cast<raw_t<S>*>(c.momentum) + base;
  raw_t<S>* __restrict v_buf = static_cast<raw_t<S>*>(c.exp_avg_sq) + base;
  raw_t<S>* __restrict vmax_buf = static_cast<raw_t<S>*>(c.max_exp_avg_sq) + base;
  raw_t<F>* __restrict slow = static_cast<raw_t<F>*>(c.slow) + base;
  // Scalars copied into locals: read through `c` they could alias the stores below, and
  // GCC would reload them every iteration instead of vectorising.
  const GradScalars grad_s = c.grad;
  const SgdScalars sgd_s = c.sgd;
  const AdamScalars adam_s = c.adam;
  const AdamStepScalars adam_t = ss.adam;
  const bool first = ss.first;
  const float bc2 = ss.bc2, eps = c.eps, lr = c.lr, alpha = c.alpha;
  // The lerps' branch and factor, once per loop: no select on a loop-invariant flag is left
  // in the loop (lookahead_math.h, lerp_weight).
  const LerpWeight m_weight = lerp_weight(adam_s.one_minus_beta1);
  const LerpWeight phi_weight = lerp_weight(alpha);
  double gd = 0.0, dad = 0.0;

#pragma omp simd reduction(+ : gd, dad)
  for (int64_t i = begin; i < end; ++i) {
    float theta = load<P>(p[i]);
    if constexpr (kInner) {
      float g = prepare_grad(load<P>(g_in[i]), grad_s);
      float m = kHasM ? load<S>(m_buf[i]) : 0.0f;
      if constexpr (kAdamKind) {
        float v = load<S>(v_buf[i]);
        float v_max = kAmsgrad ? load<S>(vmax_buf[i]) : 0.0f;
        adam_update<kAmsgrad>(theta, g, m, v, v_max, adam_s, adam_t, m_weight);
        v_buf[i] = store<S>(v);
        if constexpr (kAmsgrad) vmax_buf[i] = store<S>(v_max);
        if constexpr (kDots) {
          AlphaDots t{0.0, 0.0};
          alpha_terms(t, g, load<F>(slow[i]), rounded<P>(theta), rounded<S>(kAmsgrad ? v_max : v), bc2, eps, lr);
          gd += t.g_dot_d;
          dad += t.d_a_d;
        }
      } else {
        sgd_update<kHasM>(theta, g, m, first, sgd_s);
      }
      if constexpr (kHasM) m_buf[i] = store<S>(m);
    }
    if constexpr (kSync) {
      // θ as the parameter holds it, φ ← lerp(φ, θ, α) rounded to φ's dtype, θ ← φ.
      const float phi = rounded<F>(sync_slow(load<F>(slow[i]), rounded<P>(theta), phi_weight));
      slow[i] = store<F>(phi);
      theta = phi;
    }
    p[i] = store<P>(theta);
  }
  dots.g_dot_d += gd;
  dots.d_a_d += dad;

  if constexpr (kSync && kHasM) {
    const int64_t n = end - begin;
    if (c.inner_state == InnerState::kReset) {
      // Restart as if new: zero moments (all-zero bits are +0 in every float dtype).
      std::memset(m_buf + begin, 0, n * sizeof(raw_t<S>));
      if (kAdamKind) std::memset(v_buf + begin, 0, n * sizeof(raw_t<S>));
      if (kAmsgrad) std::memset(vmax_buf + begin, 0, n * sizeof(raw_t<S>));
    } else if (c.inner_state == InnerState::kPullback) {
      raw_t<S>* __restrict cache = static_cast<raw_t<S>*>(c.cached_momentum) + base;
      const float one_minus_alpha = c.one_minus_alpha;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float m = pullback(load<S>(m_buf[i]), load<S>(cache[i]), alpha, one_minus_alpha);
        m_buf[i] = store<S>(m);
        cache[i] = store<S>(m);  // m_cached ← m
      }
    }
  }
}

template <bool kAdamKind, bool kHasM, bool kAmsgrad, Phase kPhase, typename P, typename S, typename F>
StepResult run(const StepArgs& a, Context& c) {
  constexpr bool kSyncPhase = kPhase == Phase::kSync || kPhase == Phase::kSyncOnly;
  constexpr bool kInnerPhase = kPhase != Phase::kSyncOnly;
  const Segment* segs = c.segs;
  const int64_t n_seg = a.num_segments;
  float* step = reinterpret_cast<float*>(a.step);

  // Counters and per-parameter scalars, serially: the step advances only where there is a
  // gradient, and the bias corrections use the advanced count (reference.adam_update).
  std::vector<SegmentScalars> scalars(static_cast<size_t>(n_seg));
  if constexpr (kInnerPhase) {
    for (int64_t s = 0; s < n_seg; ++s) {
      if (!segs[s].has_grad) continue;
      SegmentScalars& ss = scalars[s];
      float& t = step[segs[s].slot];
      ss.first = t == 0.0f;
      t += 1.0f;
      const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(t));
      const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(t));
      ss.adam.neg_step_size = static_cast<float>(-(a.lr / bc1));
      ss.adam.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
      ss.bc2 = static_cast<float>(bc2);
    }
  }
  c.seg_scalars = scalars.data();

  const int64_t chunk = std::max<int64_t>(a.chunk, 1);
  const int64_t n_chunks = (a.numel + chunk - 1) / chunk;
  double gd = 0.0, dad = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : gd, dad) if (n_chunks > 1)
  for (int64_t k = 0; k < n_chunks; ++k) {
    const int64_t lo = k * chunk;
    const int64_t hi = std::min(lo + chunk, a.numel);
    // The last parameter starting at or before lo (zero-size parameters are skipped below).
    int64_t s =
        std::upper_bound(segs, segs + n_seg, lo, [](int64_t x, const Segment& r) { return x < r.offset; }) - segs - 1;
    AlphaDots dots{0.0, 0.0};
    for (; s < n_seg && segs[s].offset < hi; ++s) {
      const int64_t begin = std::max(lo, segs[s].offset) - segs[s].offset;
      const int64_t end = std::min(hi, segs[s].offset + segs[s].numel) - segs[s].offset;
      if (begin >= end) continue;
      const bool inner = kInnerPhase && segs[s].has_grad;
      if (inner) {
        walk_piece<kAdamKind, kHasM, kAmsgrad, kInnerPhase, kSyncPhase, kPhase == Phase::kInnerDots, P, S, F>(
            c, s, begin, end, dots);
      } else if (kSyncPhase) {
        walk_piece<kAdamKind, kHasM, kAmsgrad, false, kSyncPhase, false, P, S, F>(c, s, begin, end, dots);
      }
    }
    gd += dots.g_dot_d;
    dad += dots.d_a_d;
  }

  if (kSyncPhase && a.inner_state == InnerState::kReset) {
    for (int64_t s = 0; s < n_seg; ++s) step[segs[s].slot] = 0.0f;  // restart as if new
  }
  return StepResult{gd, dad};
}

template <typename P>
StepResult dispatch(const StepArgs& a, Context& c) {
  return with_storage<P>(a.state_dtype, a.slow_dtype, a.param_dtype, [&](auto s, auto f) {
    using S = typename std::decay_t<decltype(s)>::type;  // decay: GCC sees a reference in the inner lambda
    using F = typename std::decay_t<decltype(f)>::type;
    return with_inner(a.kind, a.momentum_coef != 0, a.amsgrad, [&](auto adam, auto has_m, auto ams) -> StepResult {
      constexpr bool kA = decltype(adam)::value, kM = decltype(has_m)::value, kAms = decltype(ams)::value;
      switch (a.phase) {
        case Phase::kPlain:
          return run<kA, kM, kAms, Phase::kPlain, P, S, F>(a, c);
        case Phase::kSync:
          return run<kA, kM, kAms, Phase::kSync, P, S, F>(a, c);
        case Phase::kInnerDots:
          if constexpr (kA) return run<kA, kM, kAms, Phase::kInnerDots, P, S, F>(a, c);
          throw std::invalid_argument("adaptive alpha needs Adam");
        case Phase::kSyncOnly:
          return run<kA, kM, kAms, Phase::kSyncOnly, P, S, F>(a, c);
      }
      throw std::invalid_argument("unknown phase");
    });
  });
}

}  // namespace

StepResult lookahead_step(const StepArgs& a) {
  if (a.num_segments < 0 || a.numel < 0) throw std::invalid_argument("negative sizes");
  if (a.table == 0 && a.num_segments > 0) throw std::invalid_argument("null segment table");
  if (a.step == 0 && a.num_segments > 0) throw std::invalid_argument("null step counters");
  if (a.slow == 0 && a.numel > 0 && a.phase != Phase::kPlain) throw std::invalid_argument("null slow weights");
  Context c{};
  c.segs = reinterpret_cast<const Segment*>(a.table);
  const bool decay = a.weight_decay != 0.0;
  c.grad = GradScalars{static_cast<float>(a.grad_scale), a.maximize ? -1.0f : 1.0f};
  c.sgd = SgdScalars{static_cast<float>(-a.lr),
                     static_cast<float>(a.momentum_coef),
                     static_cast<float>(1.0 - a.dampening),
                     static_cast<float>(a.weight_decay),
                     decay,
                     a.nesterov};
  const bool decoupled = a.kind == Kind::kAdamW && decay;
  c.adam = AdamScalars{
      static_cast<float>(1.0 - a.beta1),  static_cast<float>(a.beta2),
      static_cast<float>(1.0 - a.beta2),  static_cast<float>(a.eps),
      static_cast<float>(a.weight_decay), decoupled ? static_cast<float>(1.0 - a.lr * a.weight_decay) : 1.0f,
      a.kind == Kind::kAdam && decay};
  c.inner_state = a.inner_state;
  c.alpha = static_cast<float>(a.alpha);
  c.one_minus_alpha = static_cast<float>(1.0 - a.alpha);
  c.lr = static_cast<float>(a.lr);
  c.eps = static_cast<float>(a.eps);
  c.momentum = reinterpret_cast<void*>(a.momentum);
  c.exp_avg_sq = reinterpret_cast<void*>(a.exp_avg_sq);
  c.max_exp_avg_sq = reinterpret_cast<void*>(a.max_exp_avg_sq);
  c.cached_momentum = reinterpret_cast<void*>(a.cached_momentum);
  c.slow = reinterpret_cast<void*>(a.slow);
  switch (a.param_dtype) {
    case DType::kFloat32:
      return dispatch<float>(a, c);
    case DType::kBFloat16:
      return dispatch<bf16>(a, c);
    case DType::kFloat16:
      return dispatch<fp16>(a, c);
  }
  throw std::invalid_argument("unsupported parameter dtype");
}

// ---------------------------------------------------------------------------------------
// The floor: the same chunked walk and the same bytes, with a trivial update.
// ---------------------------------------------------------------------------------------

namespace {

template <int kReads, int kWrites>
void stream_chunks(float* const* buf, int64_t n, int64_t chunk) {
  static_assert(kWrites <= kReads, "written buffers are read too (in-place update)");
  const int64_t n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t k = 0; k < n_chunks; ++k) {
    const int64_t lo = k * chunk, hi = std::min(lo + chunk, n);
    float* __restrict b[kReads];
    for (int j = 0; j < kReads; ++j) b[j] = buf[j];
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      float sum = 0.0f;
      for (int j = 0; j < kReads; ++j) sum += b[j][i];
      for (int j = 0; j < kWrites; ++j) b[j][i] = 0.5f * b[j][i] + 1e-3f * sum;
    }
  }
}

template <int kReads, int kWrites = 1>
void stream_dispatch(float* const* buf, int writes, int64_t n, int64_t chunk) {
  if constexpr (kWrites <= kReads) {
    if (writes == kWrites) return stream_chunks<kReads, kWrites>(buf, n, chunk);
    return stream_dispatch<kReads, kWrites + 1>(buf, writes, n, chunk);
  }
  throw std::invalid_argument("stream_floor: writes must be between 1 and reads");
}

}  // namespace

void stream_floor(const int64_t* buffers, int reads, int writes, int64_t n, int64_t chunk) {
  std::vector<float*> buf(static_cast<size_t>(reads));
  for (int j = 0; j < reads; ++j) buf[j] = reinterpret_cast<float*>(buffers[j]);
  chunk = std::max<int64_t>(chunk, 1);
  switch (reads) {
    case 1:
      return stream_dispatch<1>(buf.data(), writes, n, chunk);
    case 2:
      return stream_dispatch<2>(buf.data(), writes, n, chunk);
    case 3:
      return stream_dispatch<3>(buf.data(), writes, n, chunk);
    case 4:
      return stream_dispatch<4>(buf.data(), writes, n, chunk);
    case 5:
      return stream_dispatch<5>(buf.data(), writes, n, chunk);
    case 6:
      return stream_dispatch<6>(buf.data(), writes, n, chunk);
    default:
      throw std::invalid_argument("stream_floor: reads must be between 1 and 6");
  }
}

// The widest SIMD extension this build was compiled for.
const char* simd_level() {
#if defined(__AVX512F__)
  return "AVX512";
#elif defined(__AVX2__)
  return "AVX2";
#elif defined(__AVX__)
  return "AVX";
#elif defined(__SSE4_2__)
  return "SSE4.2";
#elif defined(__SSE2__)
  return "SSE2";
#elif defined(__ARM_FEATURE_SVE)
  return "SVE";
#elif defined(__ARM_NEON)
  return "NEON";
#else
  return "none";
#endif
}

}  // namespace lookahead_fused::cpu::LAF_CPU_NS

// ---------------------------------------------------------------------------------------
// The dispatcher (in the build of the lowest level, which any CPU of the family runs).
// ---------------------------------------------------------------------------------------

#if defined(LAF_CPU_PRIMARY)

// LAF_CPU_ISA_TABLE(X): X(namespace, "name") per level built, lowest first; CMake writes it
// into a header of the build folder. Alone, this file is the only level.
#if defined(LAF_CPU_ISAS_HEADER)
#include LAF_CPU_ISAS_HEADER
#else
#define LAF_CPU_ISA_TABLE(X) X(single, LAF_CPU_ISA_NAME)
#endif
#ifndef LAF_CPU_ISA_NAME
#define LAF_CPU_ISA_NAME "default"
#endif

#include <atomic>

namespace lookahead_fused::cpu {

#define LAF_CPU_DECLARE(ns, name) LAF_CPU_DECLARE_ISA(ns)
LAF_CPU_ISA_TABLE(LAF_CPU_DECLARE)
#undef LAF_CPU_DECLARE

namespace {

struct Isa {
  const char* name;
  StepResult (*step)(const StepArgs&);
  void (*stream)(const int64_t*, int, int, int64_t, int64_t);
  const char* (*simd)();
};

#define LAF_CPU_ENTRY(ns, name) Isa{name, &ns::lookahead_step, &ns::stream_floor, &ns::simd_level},
const Isa kIsas[] = {LAF_CPU_ISA_TABLE(LAF_CPU_ENTRY)};
#undef LAF_CPU_ENTRY
constexpr int kNumIsas = static_cast<int>(sizeof kIsas / sizeof kIsas[0]);
static_assert(kNumIsas <= kMaxIsas, "raise kMaxIsas");

// Whether this CPU (and its OS, for the AVX registers: libgcc checks XCR0) runs the level.
// Levels other than the x86-64 ones are the baseline of their target, or a single build
// for the -march= its builder picked: taken as runnable.
bool cpu_runs(const char* name) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool v2 =
      __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("ssse3");
  const bool v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  // GCC knows the levels themselves (movbe, lzcnt, f16c, ... as well).
  if (std::strcmp(name, "x86-64-v2") == 0) return v2 && __builtin_cpu_supports("x86-64-v2");
  if (std::strcmp(name, "x86-64-v3") == 0) return v3 && __builtin_cpu_supports("x86-64-v3");
  if (std::strcmp(name, "x86-64-v4") == 0) return v4 && __builtin_cpu_supports("x86-64-v4");
#else
  if (std::strcmp(name, "x86-64-v2") == 0) return v2;
  if (std::strcmp(name, "x86-64-v3") == 0) return v3;
  if (std::strcmp(name, "x86-64-v4") == 0) return v4;
#endif
#endif
  (void)name;
  return true;
}

const bool* runs_table() {
  static const auto table = [] {
    struct T {
      bool v[kMaxIsas];
    } t{};
    for (int i = 0; i < kNumIsas; ++i) t.v[i] = cpu_runs(kIsas[i].name);
    return t;
  }();
  return table.v;
}

std::atomic<int> g_selected{-1};

int current() {
  int s = g_selected.load(std::memory_order_acquire);
  if (s >= 0) return s;
  const bool* runs = runs_table();
  s = 0;  // the lowest level runs on every CPU of its family
  for (int i = kNumIsas - 1; i > 0; --i) {
    if (runs[i]) {
      s = i;
      break;
    }
  }
  int expected = -1;
  g_selected.compare_exchange_strong(expected, s, std::memory_order_acq_rel);
  return g_selected.load(std::memory_order_acquire);
}

}  // namespace

StepResult lookahead_step(const StepArgs& args) { return kIsas[current()].step(args); }

void stream_floor(const int64_t* buffers, int reads, int writes, int64_t n, int64_t chunk) {
  kIsas[current()].stream(buffers, reads, writes, n, chunk);
}

int isa_count() { return kNumIsas; }

IsaInfo isa_info(int i) {
  if (i < 0 || i >= kNumIsas) throw std::out_of_range("no such ISA level");
  return IsaInfo{kIsas[i].name, kIsas[i].simd(), runs_table()[i]};
}

int selected_isa() { return current(); }

void select_isa(const char* name) {
  std::string built;
  for (int i = 0; i < kNumIsas; ++i) {
    if (std::strcmp(kIsas[i].name, name) == 0) {
      if (!runs_table()[i])
        throw std::invalid_argument(std::string("ISA level ") + name + " was built, but this CPU lacks it");
      g_selected.store(i, std::memory_order_release);
      return;
    }
    built += (i ? ", " : "") + std::string(kIsas[i].name);
  }
  throw std::invalid_argument(std::string("ISA level ") + name + " was not built (built: " + built + ")");
}

}  // namespace lookahead_fused::cpu

#endif  // LAF_CPU_PRIMARY
