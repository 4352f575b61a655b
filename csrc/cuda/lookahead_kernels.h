// Interface of the CUDA kernels (csrc/cuda/lookahead_kernels.cu), built twice: by nvcc into
// lookahead_fused::cuda (GPU) and by the host compiler into lookahead_fused::emulated (the
// same source run on CPU memory, backend "cuda_emulated"). bindings.cpp sees only this file:
// plain integers (addresses, a stream handle), doubles and enums; lookahead_fused/backends/
// cuda.py checks every tensor before its address gets here.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../cpu_kernels.h"  // Segment rows, Kind, InnerState, DType: one layout for both

namespace lookahead_fused::gpu {

using cpu::DType;
using cpu::InnerState;
using cpu::Kind;
using cpu::Segment;

// One row of the chunk table: a block processes [start, start + chunk_size) ∩ [0, numel) of
// segment `segment`. Chunks never span parameters, so every chunk has one set of pointers.
struct Chunk {
  int64_t segment;
  int64_t start;
};
static_assert(sizeof(Chunk) == 2 * sizeof(int64_t), "backends/cuda.py builds rows of 2 int64");

// Unlike the CPU walk, the sync decision is made by the kernels from the lookahead counter
// on the device, so a launch never waits for the host to know the step number:
//   kStep:      inner step, and on a sync step the sync (lerp, reset, inner-state policy);
//   kInnerDots: inner step, and on a sync step the adaptive-α partial sums (first pass);
//   kSyncOnly:  on a sync step the sync with the α̂ at `alpha_ptr` (second pass); else nothing.
enum class Phase : int { kStep = 0, kInnerDots = 1, kSyncOnly = 2 };

struct LaunchArgs {
  int64_t segments = 0;  // device address of num_segments Segment rows
  int64_t num_segments = 0;
  int64_t chunks = 0;  // device address of num_chunks Chunk rows
  int64_t num_chunks = 0;
  int64_t chunk_size = 1 << 16;
  int grid = 1;     // blocks (each walks chunk rows blockIdx.x, +gridDim.x, ...)
  int block = 256;  // threads per block: a power of two, at most 256
  Kind kind = Kind::kSgd;
  Phase phase = Phase::kStep;
  InnerState inner_state = InnerState::kMaintain;
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  DType slow_dtype = DType::kFloat32;
  // Flat state buffers of the bucket (0 where the variant has none).
  int64_t momentum = 0, exp_avg_sq = 0, max_exp_avg_sq = 0, cached_momentum = 0, slow = 0;
  int64_t step = 0;            // fp32 inner step counter per slot
  int64_t lookahead_step = 0;  // fp32 lookahead counter per slot (every slot holds the group's)
  // Device scalars (0: absent): lr (fp32 or fp64), GradScaler's grad_scale and found_inf
  // (fp32), and adaptive α's α̂ (fp64, written by finalize_alpha).
  int64_t lr_ptr = 0;
  bool lr_is_double = false;
  int64_t grad_scale_ptr = 0, found_inf_ptr = 0, alpha_ptr = 0;
  // kInnerDots: where this launch's grid writes its (g·d, dᵀÂd) pairs, fp64.
  int64_t partials = 0;
  // Hyperparameters.
  double lr = 0, momentum_coef = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false, amsgrad = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double alpha = 0.5;
  int64_t k = 5;
  bool advance_counters = true;  // launch the counter kernel after the step kernel
  int64_t stream = 0;            // cudaStream_t (torch's current stream)
  int device = 0;
};

// Adaptive α̂ of a group from the partial sums of its buckets' kInnerDots launches, summed in
// a fixed order by one block of 256 threads (a strided sum per thread, then a fixed tree),
// written as fp64 to `alpha_out`.
struct FinalizeArgs {
  int64_t partials = 0;
  int64_t num_partials = 0;  // pairs
  double alpha = 0.5, alpha_low = 0.0;
  int64_t alpha_out = 0;
  int64_t stream = 0;
  int device = 0;
};

}  // namespace lookahead_fused::gpu

#define LOOKAHEAD_FUSED_DECLARE_KERNEL_API(ns)                                       \
  namespace lookahead_fused::ns {                                                    \
  /* Launches the step kernel (and the counter kernel); throws on a launch error. */ \
  void step(const gpu::LaunchArgs& args);                                            \
  void finalize_alpha(const gpu::FinalizeArgs& args);                                \
  }

LOOKAHEAD_FUSED_DECLARE_KERNEL_API(emulated)

namespace lookahead_fused::emulated {
struct TrafficCounts {
  uint64_t loaded, stored, meta_loaded, meta_stored, launches;
};
TrafficCounts traffic_counts();
void traffic_reset();
// The emulated device (csrc/cuda_compat.h): block order (0: in order), the race detector, the
// address ranges of each emulated device's tensors, an error pending for the next launch, the
// LOOKAHEAD_FUSED_SYNC_CHECK setting, and kernels that misbehave on purpose.
void set_block_order_seed(uint64_t seed);
uint64_t block_order_seed();
void set_strict(bool on);
bool strict();
void set_device_ranges(int device, const std::vector<std::pair<int64_t, int64_t>>& ranges);  // (address, bytes)
void clear_device_ranges(int device);
void set_pending_error(const std::string& error);
bool sync_check_enabled();
std::string selftest(const std::string& name);
}  // namespace lookahead_fused::emulated

#if defined(LOOKAHEAD_FUSED_WITH_CUDA)
LOOKAHEAD_FUSED_DECLARE_KERNEL_API(cuda)
namespace lookahead_fused::cuda {
// "" when the step kernels can run on CUDA device `device`, else why not (no device, a driver
// too old for the runtime, no kernel image for the device's architecture).
std::string kernel_unavailable(int device);
}  // namespace lookahead_fused::cuda
#endif
