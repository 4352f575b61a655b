// The CPU kernels' interface: what bindings.cpp hands them. Only plain integers, doubles and
// raw addresses cross from Python; lookahead_fused/backends/cpu.py checks dtypes, devices,
// density and sizes before any address gets here.
#pragma once

#include <cstdint>

namespace lookahead_fused::cpu {

// One row of a bucket's segment table (an int64 CPU tensor built by backends/cpu.py), one
// row per parameter in bucket order, so `offset` is ascending and the rows tile [0, numel).
struct Segment {
  int64_t param;  // address of the parameter's first element (dense; any dim order)
  int64_t grad;   // address of its gradient, laid out like the parameter
  int64_t numel;
  int64_t offset;    // where the parameter starts in the bucket's flat state buffers
  int64_t slot;      // its slot in the bucket's "step" counter vector
  int64_t has_grad;  // 0: no inner update (the parameter still syncs); an empty grad may have address 0
};
static_assert(sizeof(Segment) == 6 * sizeof(int64_t), "backends/cpu.py builds rows of 6 int64");

enum class Kind : int { kSgd = 0, kAdam = 1, kAdamW = 2 };

// kPlain:     inner step only.
// kSync:      inner step, then the sync (lerp, reset, inner-state policy) in the same pass.
// kInnerDots: inner step that also returns the two sums adaptive α needs (first of two passes).
// kSyncOnly:  the sync alone with the α the caller picked (second pass of adaptive α).
enum class Phase : int { kPlain = 0, kSync = 1, kInnerDots = 2, kSyncOnly = 3 };

enum class InnerState : int { kMaintain = 0, kReset = 1, kPullback = 2 };

// Element dtypes, numbered as backends/cpu.py numbers them.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct StepArgs {
  int64_t table = 0;  // address of num_segments Segment rows
  int64_t num_segments = 0;
  int64_t numel = 0;        // elements of the bucket (sum of the rows' numel)
  int64_t chunk = 1 << 16;  // elements per OpenMP work item
  Kind kind = Kind::kSgd;
  Phase phase = Phase::kPlain;
  InnerState inner_state = InnerState::kMaintain;
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  DType slow_dtype = DType::kFloat32;
  // Flat state buffers of the bucket (0 where the variant has none).
  int64_t momentum = 0;  // SGD momentum_buffer or Adam exp_avg
  int64_t exp_avg_sq = 0;
  int64_t max_exp_avg_sq = 0;
  int64_t cached_momentum = 0;  // inner_state="pullback"
  int64_t slow = 0;             // φ
  int64_t step = 0;             // fp32 per-parameter inner step counters, advanced here
  // Hyperparameters, as Python floats.
  double lr = 0, momentum_coef = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false, amsgrad = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double alpha = 0.5;
  double grad_scale = 1.0;
};

struct StepResult {
  double g_dot_d = 0;  // Σ gᵀ(φ − θ), kInnerDots only
  double d_a_d = 0;    // Σ (φ − θ)ᵀ Â (φ − θ)
};

StepResult lookahead_step(const StepArgs& args);

// A streaming kernel with a given access pattern and no optimizer math: `reads` fp32
// buffers of n elements read, the first `writes` of them written back, walked with the same
// OpenMP chunking as lookahead_step. The floor the benchmark holds the optimizer against.
void stream_floor(const int64_t* buffers, int reads, int writes, int64_t n, int64_t chunk);

// ---------------------------------------------------------------------------------------
// ISA levels. csrc/cpu_kernels.cpp is compiled once per ISA level (CMakeLists.txt: by default
// x86-64, x86-64-v3 and x86-64-v4 on x86, the compiler's baseline elsewhere; a single build
// for an explicit LOOKAHEAD_FUSED_CPU_ARCH), each build in its own namespace
// lookahead_fused::cpu::<LAF_CPU_NS>. lookahead_step and stream_floor above call the level
// selected: the highest one this CPU supports, chosen at the first call, so that a portable
// build never executes an instruction the CPU lacks.
// ---------------------------------------------------------------------------------------

struct IsaInfo {
  const char* name;  // "x86-64-v3", or the -march= of a single build
  const char* simd;  // the widest SIMD extension it was compiled for: "AVX512", "AVX2", "SSE2", "NEON", ...
  bool supported;    // whether this CPU can run it
};

// The levels built, lowest first (at most kMaxIsas).
constexpr int kMaxIsas = 8;
int isa_count();
IsaInfo isa_info(int i);
int selected_isa();  // index of the level lookahead_step runs
// Runs the named level from now on (tests compare the levels). Throws std::invalid_argument
// for a level that was not built or that this CPU lacks.
void select_isa(const char* name);

// What each ISA build defines (cpu_kernels.cpp), declared for the dispatcher.
#define LAF_CPU_DECLARE_ISA(ns)                                                               \
  namespace ns {                                                                              \
  StepResult lookahead_step(const StepArgs& args);                                            \
  void stream_floor(const int64_t* buffers, int reads, int writes, int64_t n, int64_t chunk); \
  const char* simd_level();                                                                   \
  }

}  // namespace lookahead_fused::cpu
