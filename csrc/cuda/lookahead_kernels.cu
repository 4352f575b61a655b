// Fused Lookahead steps as CUDA kernels: one launch per bucket per step does the inner SGD /
// Adam / AdamW update and, on a sync step, the lerp of the slow weights, the reset of the fast
// ones and the inner-state policy, in the same pass over memory. The per-element math is
// csrc/lookahead_math.h (shared with the CPU kernels); this file only walks memory.
//
// Compiled twice (csrc/cuda_compat.h): by nvcc into GPU kernels, and by the host compiler
// (csrc/cuda/emulated.cpp) into the backend "cuda_emulated", which runs these very kernels on
// CPU memory so that CI without a GPU executes every line below against the reference.
//
// Work distribution (multi-tensor): the bucket's parameters are cut into chunks of
// chunk_size elements that never span two parameters (the chunk table, built once per
// bucket by backends/cuda.py and kept on the device); block b walks rows b, b + gridDim.x,
// ..., so a grid sized for the device covers ResNet-152's 467 tensors in one launch. The
// chunk size (per launch) and the order of the rows are chosen by backends/cuda.py
// (plan_chunks) so that every block gets about the same work. In a
// chunk, threads take V consecutive elements each (V = 4: one 128-bit load of fp32 data, 64
// bits of bf16/fp16) when every pointer of the chunk is aligned for it, else one element at a
// time. Indices are 64-bit.
//
// Counters without races: the step kernel only reads the counters (`step`, `lookahead_step`)
// and computes the advanced values in registers; a second, one-block kernel advances them
// after it, in stream order. So no block ever writes a counter that another block of the same
// launch reads, and the sync decision needs no host: every thread derives it from the
// lookahead counter. A GradScaler step with found_inf set changes nothing, counters included.
//
// Variants: the optimizer (SGD, SGD with momentum, Adam/AdamW, with amsgrad), the phase and
// the three storage dtypes are template parameters of one kernel body; whether the chunk's
// parameter has a gradient and whether this is a sync step are block-uniform branches between
// instantiations of the same element function. Flags that do not change memory traffic
// (nesterov, maximize, weight decay, dampening, the inner-state policy) are runtime values.
#include "../cuda_compat.h"
#include "../lookahead_math.h"
#include "lookahead_kernels.h"
#include "../variant_dispatch.h"

#include <stdexcept>
#include <string>
#include <type_traits>
#if !defined(__CUDACC__)
#include <cmath>
using std::pow;
#endif

namespace lookahead_fused::LAF_NS {
namespace {

using gpu::Chunk;
using gpu::DType;
using gpu::InnerState;
using gpu::Kind;
using gpu::Phase;
using gpu::Segment;

constexpr int kVec = 4;         // elements per vector access
constexpr int kMaxBlock = 256;  // block size bound (shared memory of the α reduction)

// Everything a step kernel needs, by value (kernel argument space).
struct Params {
  const Segment* segs;
  const Chunk* chunks;
  int64_t num_chunks;
  int64_t chunk_size;
  void* momentum;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* cached_momentum;
  void* slow;
  const float* step;
  const float* lookahead_step;
  const void* lr_ptr;
  bool lr_is_double;
  const float* grad_scale;
  const float* found_inf;
  const double* alpha_ptr;
  double* partials;
  double lr, momentum_coef, dampening, weight_decay, beta1, beta2, eps, alpha;
  bool nesterov, maximize, decoupled, l2;
  InnerState inner_state;
  int64_t k;
};

// Compile-time shape of a variant.
template <bool kAdamKind_, bool kHasM_, bool kAmsgrad_, Phase kPhase_, typename P_, typename S_, typename F_>
struct Variant {
  static constexpr bool kAdamKind = kAdamKind_, kHasM = kHasM_, kAmsgrad = kAmsgrad_;
  static constexpr Phase kPhase = kPhase_;
  using P = P_;
  using S = S_;
  using F = F_;
};

// Block-uniform scalars of one chunk.
struct ChunkScalars {
  GradScalars grad;
  SgdScalars sgd;
  AdamScalars adam;
  AdamStepScalars adam_t;
  bool first;  // SGD: the parameter's first step (momentum buffer starts as the gradient)
  float bc2, lr, eps, alpha, one_minus_alpha;
  InnerState inner_state;
};

// The bucket's pointers at one chunk's first element.
template <class V>
struct ChunkPtrs {
  raw_t<typename V::P>* p;
  const raw_t<typename V::P>* g;
  raw_t<typename V::S>* m;
  raw_t<typename V::S>* v;
  raw_t<typename V::S>* vmax;
  raw_t<typename V::S>* cache;
  raw_t<typename V::F>* phi;
};

template <int N, typename T>
LAF_DEVICE bool aligned_for(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// N consecutive elements from i: load what the variant reads, do the math of the CPU walk
// (cpu_kernels.cpp, walk_piece) per element, store what it writes. Nothing is loaded or
// stored that the step does not need, so traffic is the minimum of DESIGN.md §4.
template <class V, bool kInner, bool kSync, bool kDots, int N>
LAF_DEVICE void elements(const ChunkScalars& c, const ChunkPtrs<V>& q, int64_t i, AlphaDots& dots) {
  using P = typename V::P;
  using S = typename V::S;
  using F = typename V::F;
  using RS = raw_t<S>;
  constexpr bool kHasM = V::kHasM, kAdam = V::kAdamKind, kAms = V::kAmsgrad;
  const bool do_pullback = kSync && kHasM && c.inner_state == InnerState::kPullback;
  const bool reset = kSync && c.inner_state == InnerState::kReset;

  Vec<raw_t<P>, N> th = ld<raw_t<P>, N>(q.p + i);
  Vec<raw_t<P>, N> gv{};
  Vec<RS, N> mv{}, vv{}, vmv{}, cv{};
  Vec<raw_t<F>, N> phiv{};
  if (kInner) {
    gv = ld<raw_t<P>, N>(q.g + i);
    if (kHasM) mv = ld<RS, N>(q.m + i);
    if (kAdam) vv = ld<RS, N>(q.v + i);
    if (kAms) vmv = ld<RS, N>(q.vmax + i);
  }
  if (kSync || kDots) phiv = ld<raw_t<F>, N>(q.phi + i);
  if (do_pullback) {
    if (!kInner) mv = ld<RS, N>(q.m + i);
    cv = ld<RS, N>(q.cache + i);
  }

  LAF_UNROLL
  for (int j = 0; j < N; ++j) {
    float theta = load<P>(th.v[j]);
    float m = kHasM ? load<S>(mv.v[j]) : 0.0f;
    if (kInner) {
      float g = prepare_grad(load<P>(gv.v[j]), c.grad);
      if (kAdam) {
        float v = load<S>(vv.v[j]);
        float v_max = kAms ? load<S>(vmv.v[j]) : 0.0f;
        adam_update<kAms>(theta, g, m, v, v_max, c.adam, c.adam_t);
        vv.v[j] = store<S>(v);
        if (kAms) vmv.v[j] = store<S>(v_max);
        if (kDots) {
          alpha_terms(dots, g, load<F>(phiv.v[j]), rounded<P>(theta), rounded<S>(kAms ? v_max : v), c.bc2, c.eps, c.lr);
        }
      } else {
        sgd_update<kHasM>(theta, g, m, c.first, c.sgd);
      }
      m = rounded<S>(m);  // what the buffer holds; pullback reads it back
    }
    if (kSync) {
      // θ as the parameter holds it, φ ← lerp(φ, θ, α) rounded to φ's dtype, θ ← φ.
      const float phi = rounded<F>(sync_slow(load<F>(phiv.v[j]), rounded<P>(theta), c.alpha));
      phiv.v[j] = store<F>(phi);
      theta = phi;
      if (do_pullback) {
        m = pullback(m, load<S>(cv.v[j]), c.alpha, c.one_minus_alpha);
        cv.v[j] = store<S>(m);  // m_cached ← m
      }
    }
    th.v[j] = store<P>(theta);
    if (kHasM) mv.v[j] = store<S>(m);
  }

  st<raw_t<P>, N>(q.p + i, th);
  if (kSync) st<raw_t<F>, N>(q.phi + i, phiv);
  if (reset && kHasM) {
    // Restart as if new: zero moments (all-zero bits are +0 in every float dtype).
    const Vec<RS, N> zero{};
    st<RS, N>(q.m + i, zero);
    if (kAdam) st<RS, N>(q.v + i, zero);
    if (kAms) st<RS, N>(q.vmax + i, zero);
    return;
  }
  if (kHasM && (kInner || do_pullback)) st<RS, N>(q.m + i, mv);
  if (do_pullback) st<RS, N>(q.cache + i, cv);
  if (kInner && kAdam) st<RS, N>(q.v + i, vv);
  if (kInner && kAms) st<RS, N>(q.vmax + i, vmv);
}

// One chunk of `len` elements: vectors where every pointer allows, then the scalar tail.
template <class V, bool kInner, bool kSync, bool kDots>
LAF_DEVICE void walk_chunk(const ChunkScalars& c, const ChunkPtrs<V>& q, int64_t len, bool inner_ptrs_ok,
                           AlphaDots& dots) {
  const bool aligned = aligned_for<kVec>(q.p) && aligned_for<kVec>(q.phi) && inner_ptrs_ok &&
                       (!V::kHasM || (aligned_for<kVec>(q.m) && aligned_for<kVec>(q.cache)));
  const int64_t tid = threadIdx.x, stride = blockDim.x;
  int64_t vec_end = 0;
  if (aligned) {
    vec_end = len / kVec * kVec;
    for (int64_t i = tid * kVec; i < vec_end; i += stride * kVec)
      elements<V, kInner, kSync, kDots, kVec>(c, q, i, dots);
  }
  for (int64_t i = vec_end + tid; i < len; i += stride) elements<V, kInner, kSync, kDots, 1>(c, q, i, dots);
}

template <class V>
LAF_DEVICE double read_lr(const Params& a) {
  if (a.lr_ptr == nullptr) return a.lr;
  return a.lr_is_double ? ld_meta(static_cast<const double*>(a.lr_ptr))
                        : static_cast<double>(ld_meta(static_cast<const float*>(a.lr_ptr)));
}

// A fixed tree over the block's threads (width halving, blockDim.x a power of two): afterwards
// s_gd[0] and s_dad[0] hold the sums of every thread's (gd, dad), added in an order fixed by
// blockDim.x alone, so the result does not depend on scheduling. Both adaptive-α reductions
// (per block in the step kernel, over the blocks' pairs in finalize_kernel) use it.
LAF_DEVICE void block_tree_sum(double* s_gd, double* s_dad, double gd, double dad) {
  const unsigned tid = threadIdx.x;
  s_gd[tid] = gd;
  s_dad[tid] = dad;
  __syncthreads();
  for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
    if (tid < width) {
      s_gd[tid] += s_gd[tid + width];
      s_dad[tid] += s_dad[tid + width];
    }
    __syncthreads();
  }
}

// The step kernel: every variant is an instantiation of this body.
template <class V>
__global__ void __launch_bounds__(kMaxBlock) step_kernel(Params a) {
  using P = typename V::P;
  using S = typename V::S;
  using F = typename V::F;
  constexpr bool kDotsPhase = V::kPhase == Phase::kInnerDots;
  AlphaDots dots{0.0, 0.0};

  // GradScaler found inf/NaN: nothing changes (but every thread still reaches the reduction).
  const bool skip = a.found_inf != nullptr && ld_meta(a.found_inf) != 0.0f;
  if (!skip) {
    const double lr = read_lr<V>(a);
    ChunkScalars c{};
    c.grad = GradScalars{a.grad_scale != nullptr ? ld_meta(a.grad_scale) : 1.0f, a.maximize ? -1.0f : 1.0f};
    c.sgd = SgdScalars{static_cast<float>(-lr),
                       static_cast<float>(a.momentum_coef),
                       static_cast<float>(1.0 - a.dampening),
                       static_cast<float>(a.weight_decay),
                       a.weight_decay != 0.0,
                       a.nesterov};
    c.adam = AdamScalars{static_cast<float>(1.0 - a.beta1),
                         static_cast<float>(a.beta2),
                         static_cast<float>(1.0 - a.beta2),
                         static_cast<float>(a.eps),
                         static_cast<float>(a.weight_decay),
                         a.decoupled ? static_cast<float>(1.0 - lr * a.weight_decay) : 1.0f,
                         a.l2};
    const double alpha = a.alpha_ptr != nullptr ? ld_meta(a.alpha_ptr) : a.alpha;
    c.alpha = static_cast<float>(alpha);
    c.one_minus_alpha = static_cast<float>(1.0 - alpha);
    c.lr = static_cast<float>(lr);
    c.eps = static_cast<float>(a.eps);
    c.inner_state = a.inner_state;

    for (int64_t k = blockIdx.x; k < a.num_chunks; k += gridDim.x) {
      const Chunk chunk = ld_meta(a.chunks + k);
      const Segment seg = ld_meta(a.segs + chunk.segment);
      // The group's counter after this step; every slot holds it (backends/cuda.py).
      const int64_t count = static_cast<int64_t>(ld_meta(a.lookahead_step + seg.slot)) + 1;
      const bool sync = count % a.k == 0;
      const bool inner = V::kPhase != Phase::kSyncOnly && seg.has_grad != 0;
      const bool do_sync = sync && V::kPhase != Phase::kInnerDots;
      if (!inner && !do_sync) continue;  // a plain step of a parameter without gradient
      const int64_t len = (seg.numel - chunk.start < a.chunk_size) ? seg.numel - chunk.start : a.chunk_size;

      if (inner) {
        // The parameter's own inner step after this one, and its bias corrections, in double
        // as torch.optim computes them (cpu_kernels.cpp does the same per parameter).
        const float t_old = ld_meta(a.step + seg.slot);
        const double t = static_cast<double>(t_old + 1.0f);
        c.first = t_old == 0.0f;
        const double bc1 = 1.0 - pow(a.beta1, t);
        const double bc2 = 1.0 - pow(a.beta2, t);
        c.adam_t.neg_step_size = static_cast<float>(-(lr / bc1));
        c.adam_t.bc2_sqrt = static_cast<float>(pow(bc2, 0.5));
        c.bc2 = static_cast<float>(bc2);
      }

      const int64_t off = seg.offset + chunk.start;
      ChunkPtrs<V> q;
      // (Pointers from the table are generic to nvcc: θ and g go through LD/ST, not LDG/STG.
      // __builtin_assume(__isGlobal(p)) turns them into LDG/STG but makes ptxas spill a few
      // bytes in some variants on sm_86/sm_89: kept generic; see tests/test_cuda_build.py.)
      q.p = reinterpret_cast<raw_t<P>*>(seg.param) + chunk.start;
      q.g = reinterpret_cast<const raw_t<P>*>(seg.grad) + chunk.start;
      q.m = static_cast<raw_t<S>*>(a.momentum) + off;
      q.v = static_cast<raw_t<S>*>(a.exp_avg_sq) + off;
      q.vmax = static_cast<raw_t<S>*>(a.max_exp_avg_sq) + off;
      q.cache = static_cast<raw_t<S>*>(a.cached_momentum) + off;
      q.phi = static_cast<raw_t<F>*>(a.slow) + off;
      // Absent buffers are null + off: "aligned" whenever off is, and never dereferenced.
      const bool inner_ok = aligned_for<kVec>(q.g) && aligned_for<kVec>(q.v) && aligned_for<kVec>(q.vmax);

      if (inner && do_sync) {
        walk_chunk<V, true, true, false>(c, q, len, inner_ok, dots);
      } else if (inner && kDotsPhase && sync) {
        walk_chunk<V, true, false, kDotsPhase>(c, q, len, inner_ok, dots);
      } else if (inner) {
        walk_chunk<V, true, false, false>(c, q, len, inner_ok, dots);
      } else {
        // No gradient is read, but a reset sync still zeroes v and vmax with vector stores.
        walk_chunk<V, false, true, false>(c, q, len, aligned_for<kVec>(q.v) && aligned_for<kVec>(q.vmax), dots);
      }
    }
  }

  if constexpr (kDotsPhase) {
    // Stage one of the deterministic reduction: a fixed tree over the block's threads, one
    // pair per block to `partials`; finalize_kernel reduces the pairs in a fixed order.
    LAF_SHARED(double, s_gd, kMaxBlock);
    LAF_SHARED(double, s_dad, kMaxBlock);
    block_tree_sum(s_gd, s_dad, dots.g_dot_d, dots.d_a_d);
    if (threadIdx.x == 0) {
      st_meta(a.partials + 2 * blockIdx.x, s_gd[0]);
      st_meta(a.partials + 2 * blockIdx.x + 1, s_dad[0]);
    }
  }
}

// After the step kernel, in stream order: the counters advance (inner step where there was a
// gradient, lookahead counter everywhere), and a reset sync restarts the inner step. Each
// thread reads and writes only its own slots.
struct CounterParams {
  const Segment* segs;
  int64_t num_segments;
  float* step;
  float* lookahead_step;
  const float* found_inf;
  int64_t k;
  bool reset;
};

__global__ void __launch_bounds__(kMaxBlock) counter_kernel(CounterParams a) {
  if (a.found_inf != nullptr && ld_meta(a.found_inf) != 0.0f) return;
  for (int64_t s = threadIdx.x; s < a.num_segments; s += blockDim.x) {
    const Segment seg = ld_meta(a.segs + s);
    const float count = ld_meta(a.lookahead_step + seg.slot) + 1.0f;
    st_meta(a.lookahead_step + seg.slot, count);
    const bool sync = static_cast<int64_t>(count) % a.k == 0;
    if (a.reset && sync) {
      st_meta(a.step + seg.slot, 0.0f);
    } else if (seg.has_grad != 0) {
      st_meta(a.step + seg.slot, ld_meta(a.step + seg.slot) + 1.0f);
    }
  }
}

// Stage two of adaptive α: one block of kFinalizeThreads threads. Thread t sums the pairs t,
// t + kFinalizeThreads, t + 2 kFinalizeThreads, ... in that order; then a fixed tree in shared
// memory (width halving, as in stage one) adds the threads' sums. Every addition and its order
// are fixed by the number of pairs alone, so the result does not depend on scheduling: the same
// on every run and every replay. (The emulation runs the same tree, but it is not the GPU's
// bits: nvcc contracts products and sums into FMAs (the default --fmad=true), the host build
// does not, so α̂ on a GPU may differ from the emulation's in the last place; the tests hold
// both to the reference's tolerance.) Then α̂ as reference.adaptive_alpha.
constexpr unsigned kFinalizeThreads = kMaxBlock;

struct FinalizeParams {
  const double* partials;
  int64_t num_partials;
  double alpha, alpha_low;
  double* alpha_out;
};

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(FinalizeParams a) {
  LAF_SHARED(double, s_gd, kFinalizeThreads);
  LAF_SHARED(double, s_dad, kFinalizeThreads);
  double gd = 0.0, dad = 0.0;
  for (int64_t i = threadIdx.x; i < a.num_partials; i += blockDim.x) {
    gd += ld_meta(a.partials + 2 * i);
    dad += ld_meta(a.partials + 2 * i + 1);
  }
  block_tree_sum(s_gd, s_dad, gd, dad);
  if (threadIdx.x != 0) return;
  gd = s_gd[0];
  dad = s_dad[0];
  double alpha = a.alpha;
  if (dad != 0.0 && dad - dad == 0.0) {  // finite and nonzero
    alpha = 1.0 + gd / dad;
    alpha = alpha < a.alpha_low ? a.alpha_low : alpha;
    alpha = alpha > 1.0 ? 1.0 : alpha;
  }
  st_meta(a.alpha_out, alpha);
}

// ---------------------------------------------------------------------------------------
// Host side: pick the instantiation, launch, turn launch errors into exceptions.
// ---------------------------------------------------------------------------------------

#if defined(__CUDACC__)
// Sets the device for the scope of a launch and restores the caller's, only where it changed
// it. (backends/cuda.py launches under torch's device guard already, so it changes nothing
// there: torch's restores a device only where that device has a context.) A failed restore
// leaves no error pending for the next launch to report.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  static void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("lookahead_fused: ") + what + ": " + cudaGetErrorString(e));
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};
#define LAF_DEVICE_SCOPE(d) DeviceGuard device_guard_(d)

#else
#define LAF_DEVICE_SCOPE(d) DeviceScope device_scope_(d)
#endif

// A launch's error (cuda_compat.h says where it was seen) as an exception naming the kernel.
void check_launch(const LaunchStatus& status, const char* kernel) {
  if (status.stage != LaunchStage::kOk) throw std::runtime_error(status.message(kernel));
}

template <class V>
void launch_step(const gpu::LaunchArgs& a, const Params& p) {
  check_launch(launch(step_kernel<V>, static_cast<unsigned>(a.grid), static_cast<unsigned>(a.block),
                      V::kPhase == Phase::kInnerDots, a.stream, p),
               V::kPhase == Phase::kInnerDots  ? "lookahead step_kernel (adaptive alpha, pass 1)"
               : V::kPhase == Phase::kSyncOnly ? "lookahead step_kernel (adaptive alpha, pass 2)"
                                               : "lookahead step_kernel");
}

template <typename P>
void dispatch(const gpu::LaunchArgs& a, const Params& p) {
  with_storage<P>(a.state_dtype, a.slow_dtype, a.param_dtype, [&](auto s, auto f) {
    using S = typename std::decay_t<decltype(s)>::type;  // decay: GCC sees a reference in the inner lambda
    using F = typename std::decay_t<decltype(f)>::type;
    with_inner(a.kind, a.momentum_coef != 0, a.amsgrad, [&](auto adam, auto has_m, auto ams) {
      constexpr bool kA = decltype(adam)::value, kM = decltype(has_m)::value, kAms = decltype(ams)::value;
      switch (a.phase) {
        case Phase::kStep:
          return launch_step<Variant<kA, kM, kAms, Phase::kStep, P, S, F>>(a, p);
        case Phase::kInnerDots:
          if constexpr (kA) return launch_step<Variant<kA, kM, kAms, Phase::kInnerDots, P, S, F>>(a, p);
          throw std::invalid_argument("adaptive alpha needs Adam");
        case Phase::kSyncOnly:
          return launch_step<Variant<kA, kM, kAms, Phase::kSyncOnly, P, S, F>>(a, p);
      }
      throw std::invalid_argument("unknown phase");
    });
  });
}

}  // namespace

void step(const gpu::LaunchArgs& a) {
  if (a.num_segments < 0 || a.num_chunks < 0 || a.chunk_size <= 0) throw std::invalid_argument("bad sizes");
  if (a.block <= 0 || a.block > kMaxBlock || (a.block & (a.block - 1)) != 0)
    throw std::invalid_argument("block must be a power of two of at most 256 threads");
  if (a.grid <= 0) throw std::invalid_argument("grid must be positive");
  if (a.k <= 0) throw std::invalid_argument("k must be positive");
  if (a.num_segments > 0 && (a.segments == 0 || a.step == 0 || a.lookahead_step == 0))
    throw std::invalid_argument("null segment table or counters");
  // Chunks exist where there are elements; a bucket of empty parameters has none (and
  // empty buffers may have null addresses), but its counters still advance.
  if (a.num_chunks > 0 && (a.chunks == 0 || a.slow == 0))
    throw std::invalid_argument("null chunk table or slow weights");
  if (a.phase == Phase::kInnerDots && a.partials == 0) throw std::invalid_argument("null partials buffer");
  if (a.num_segments == 0) return;
  LAF_DEVICE_SCOPE(a.device);

  Params p{};
  p.segs = reinterpret_cast<const Segment*>(a.segments);
  p.chunks = reinterpret_cast<const Chunk*>(a.chunks);
  p.num_chunks = a.num_chunks;
  p.chunk_size = a.chunk_size;
  p.momentum = reinterpret_cast<void*>(a.momentum);
  p.exp_avg_sq = reinterpret_cast<void*>(a.exp_avg_sq);
  p.max_exp_avg_sq = reinterpret_cast<void*>(a.max_exp_avg_sq);
  p.cached_momentum = reinterpret_cast<void*>(a.cached_momentum);
  p.slow = reinterpret_cast<void*>(a.slow);
  p.step = reinterpret_cast<const float*>(a.step);
  p.lookahead_step = reinterpret_cast<const float*>(a.lookahead_step);
  p.lr_ptr = reinterpret_cast<const void*>(a.lr_ptr);
  p.lr_is_double = a.lr_is_double;
  p.grad_scale = reinterpret_cast<const float*>(a.grad_scale_ptr);
  p.found_inf = reinterpret_cast<const float*>(a.found_inf_ptr);
  p.alpha_ptr = reinterpret_cast<const double*>(a.alpha_ptr);
  p.partials = reinterpret_cast<double*>(a.partials);
  p.lr = a.lr, p.momentum_coef = a.momentum_coef, p.dampening = a.dampening, p.weight_decay = a.weight_decay;
  p.beta1 = a.beta1, p.beta2 = a.beta2, p.eps = a.eps, p.alpha = a.alpha;
  p.nesterov = a.nesterov, p.maximize = a.maximize;
  p.decoupled = a.kind == Kind::kAdamW && a.weight_decay != 0.0;
  p.l2 = a.kind == Kind::kAdam && a.weight_decay != 0.0;
  p.inner_state = a.inner_state;
  p.k = a.k;

  switch (a.param_dtype) {
    case DType::kFloat32:
      dispatch<float>(a, p);
      break;
    case DType::kBFloat16:
      dispatch<bf16>(a, p);
      break;
    case DType::kFloat16:
      dispatch<fp16>(a, p);
      break;
    default:
      throw std::invalid_argument("unsupported parameter dtype");
  }

  if (a.advance_counters) {
    const CounterParams cp{p.segs,
                           a.num_segments,
                           reinterpret_cast<float*>(a.step),
                           reinterpret_cast<float*>(a.lookahead_step),
                           p.found_inf,
                           a.k,
                           a.inner_state == InnerState::kReset};
    const int64_t threads = a.num_segments < kMaxBlock ? a.num_segments : kMaxBlock;
    check_launch(launch(counter_kernel, 1u, static_cast<unsigned>(threads), false, a.stream, cp),
                 "lookahead counter_kernel");
  }
}

void finalize_alpha(const gpu::FinalizeArgs& a) {
  if (a.partials == 0 || a.alpha_out == 0 || a.num_partials < 0) throw std::invalid_argument("bad finalize args");
  LAF_DEVICE_SCOPE(a.device);
  const FinalizeParams p{reinterpret_cast<const double*>(a.partials), a.num_partials, a.alpha, a.alpha_low,
                         reinterpret_cast<double*>(a.alpha_out)};
  check_launch(launch(finalize_kernel, 1u, kFinalizeThreads, true, a.stream, p),
               "lookahead finalize_kernel (adaptive alpha)");
}

#if defined(__CUDACC__)
std::string kernel_unavailable(int device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error for the next caller
    return std::string("no CUDA device usable by the CUDA runtime: cudaGetDeviceCount: ") + cudaGetErrorString(e);
  }
  if (device < 0 || device >= count) return "no CUDA device " + std::to_string(device);
  cudaDeviceProp prop{};
  e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) return std::string("cudaGetDeviceProperties: ") + cudaGetErrorString(e);
  LAF_DEVICE_SCOPE(device);
  // The runtime knows whether this binary holds code the device can run (SASS of a compatible
  // architecture, or PTX it can compile): ask it about one step kernel.
  cudaFuncAttributes attr{};
  e = cudaFuncGetAttributes(&attr, step_kernel<Variant<true, true, false, Phase::kStep, float, float, float>>);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return "no kernel for sm_" + std::to_string(prop.major * 10 + prop.minor) + " in this build (" +
           cudaGetErrorName(e) + ")";
  }
  return "";
}
#endif

}  // namespace lookahead_fused::LAF_NS
