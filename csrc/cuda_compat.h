// One kernel source, two compilers (DESIGN.md §5, §6). csrc/cuda/lookahead_kernels.cu is
// compiled by nvcc into real GPU kernels (namespace lookahead_fused::cuda) and by the host
// compiler into the "cuda_emulated" backend (namespace lookahead_fused::emulated). This
// header is what makes the second possible and what every kernel touches instead of CUDA
// directly:
//   - LAF_NS: the namespace of the build (two builds in one _C must not collide at link time);
//   - on the host: __global__/__device__/__shared__, dim3, blockIdx/threadIdx/blockDim/gridDim
//     as thread-local variables, __syncthreads as a barrier between a block's threads;
//   - launch(): the only way a kernel is started. On the GPU it is <<<grid, block, 0, stream>>>;
//     on the host it runs the blocks one after another and, within a block, the threads one
//     after another, or, for kernels that synchronise (block reductions), one std::thread per
//     CUDA thread meeting at a barrier;
//   - ld()/st(): every global load and store of the kernels, scalar or 128-bit vector. On the
//     host they count bytes, so a test can check each variant's memory traffic per element.
//     Loads of the chunk table, counters and device scalars go through ld_meta()/st_meta()
//     and are counted apart: they are per chunk, not per element.
//   - LAF_SHARED(T, name, n): a block's static shared array (on the host: registered, so a
//     launch over 48 KB of static shared memory fails as on the GPU).
// The host emulation is strict where a GPU is (DESIGN.md §5): a vector access must be aligned
// to its size ("misaligned address"), launches respect the GPU's limits (block, grid, 4 KB of
// parameters, 48 KB of static shared memory), blocks may run in a shuffled order
// (emulated_set_block_order_seed), an access outside the tensors registered for the launch's
// device fails ("illegal address", emulated_set_device_ranges), and, in strict mode
// (emulated_set_strict), an address written by one block and touched by another in the same
// launch fails ("race"). A fault is recorded (the first one wins), the faulting access is not
// performed, and the launch stops after the current block and returns the message.
// LOOKAHEAD_FUSED_SYNC_CHECK=1 (read once): every launch is followed by a synchronisation of
// its stream, so an asynchronous fault is reported by the launch that caused it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LAF_NS cuda
#define LAF_DEVICE __device__ __forceinline__
#define LAF_UNROLL _Pragma("unroll")
#define LAF_SHARED(T, name, n) __shared__ T name[n]
#else
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>
#define LAF_NS emulated
#define LAF_DEVICE inline
#define LAF_UNROLL _Pragma("GCC unroll 8")
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time on the host, so a block's shared memory can be a static local.
#define __shared__ static
#define LAF_SHARED(T, name, n) \
  static T name[n];            \
  ::lookahead_fused::emulated::declare_shared(static_cast<void*>(name), sizeof(name))
#endif

namespace lookahead_fused::LAF_NS {

// LOOKAHEAD_FUSED_SYNC_CHECK set (and not "0"): every launch synchronises its stream after it.
// Read once, at the first launch.
inline bool sync_check() {
  static const bool on = [] {
    const char* e = std::getenv("LOOKAHEAD_FUSED_SYNC_CHECK");
    return e != nullptr && e[0] != '\0' && std::strcmp(e, "0") != 0;
  }();
  return on;
}

// What a launch reports, and where the error was seen.
enum class LaunchStage : int {
  kOk = 0,
  kEarlier = 1,  // an error was pending before the launch (not this kernel's)
  kLaunch = 2,   // the launch itself (configuration, resources) or, in the emulation, the run
  kSync = 3,     // the synchronisation after the launch (LOOKAHEAD_FUSED_SYNC_CHECK)
};

inline std::string launch_message(LaunchStage stage, const char* kernel, const std::string& error) {
  switch (stage) {
    case LaunchStage::kEarlier:
      return std::string("lookahead_fused: an earlier CUDA error, pending before kernel ") + kernel +
             " was launched (not raised by it): " + error;
    case LaunchStage::kSync:
      return std::string("lookahead_fused: kernel ") + kernel +
             " failed (seen by the stream synchronisation after it, LOOKAHEAD_FUSED_SYNC_CHECK): " + error;
    default:
      return std::string("lookahead_fused: kernel ") + kernel + " failed: " + error;
  }
}

// A vector of N elements of T, aligned to its size: N * sizeof(T) = 16 bytes is one 128-bit
// load or store on the GPU.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

#if defined(__CUDACC__)

template <typename T, int N>
LAF_DEVICE Vec<T, N> ld(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
LAF_DEVICE void st(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}
template <typename T>
LAF_DEVICE T ld_meta(const T* p) {
  return *p;
}
template <typename T>
LAF_DEVICE void st_meta(T* p, T x) {
  *p = x;
}

struct LaunchStatus {
  LaunchStage stage = LaunchStage::kOk;
  cudaError_t error = cudaSuccess;
  std::string message(const char* kernel) const {
    return launch_message(stage, kernel, std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error));
  }
};

// cudaGetLastError before the launch too: an error pending from earlier work is reported as
// such (and cleared), not as this kernel's.
template <typename Kernel, typename... Args>
LaunchStatus launch(Kernel kernel, unsigned grid, unsigned block, bool /*synchronises*/, int64_t stream,
                    const Args&... args) {
  const cudaError_t earlier = cudaGetLastError();
  if (earlier != cudaSuccess) return {LaunchStage::kEarlier, earlier};
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  kernel<<<grid, block, 0, s>>>(args...);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return {LaunchStage::kLaunch, e};
  if (sync_check()) {
    // Not while the stream is captured into a CUDA graph: a synchronise would invalidate the
    // capture. (A stream that cannot say, e.g. the legacy stream beside a global capture, is
    // not synchronised either, and the query's error is cleared.)
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &capture) != cudaSuccess) {
      cudaGetLastError();
      return {};
    }
    if (capture != cudaStreamCaptureStatusNone) return {};
    const cudaError_t synced = cudaStreamSynchronize(s);
    if (synced != cudaSuccess) {
      cudaGetLastError();
      return {LaunchStage::kSync, synced};
    }
  }
  return {};
}

#else  // host emulation

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

// Bytes that went through ld/st (per element) and ld_meta/st_meta (per chunk), and launches.
struct Traffic {
  std::atomic<uint64_t> loaded{0}, stored{0}, meta_loaded{0}, meta_stored{0}, launches{0};
};
inline Traffic traffic;

// Settings of the emulated device (bindings.cpp: emulated_set_*).
struct Settings {
  std::atomic<uint64_t> block_order_seed{0};  // 0: blocks in order
  std::atomic<bool> strict{false};            // race detector
  std::mutex mu;
  std::unordered_map<int, std::vector<std::pair<uintptr_t, uintptr_t>>> ranges;  // device -> [begin, end)
  std::string pending;  // an "earlier error" for the next launch (tests of the error path)
};
inline Settings settings;

// One launch in flight: its device's memory, the first fault, the race detector's shadow.
struct LaunchState {
  int device = 0;
  const std::vector<std::pair<uintptr_t, uintptr_t>>* ranges = nullptr;  // null: unchecked
  bool strict = false;
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
  struct Shadow {
    int64_t writer = -1, reader = -1;
    bool readers = false;  // read by more than one block
  };
  std::unordered_map<uintptr_t, Shadow> shadow;  // per 2-byte granule
  std::vector<std::pair<const void*, size_t>> shared;

  void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mu);
    if (!failed.load()) error = message, failed = true;
  }
};
inline thread_local LaunchState* current_launch = nullptr;
// The emulated device the calling thread launches on (DeviceScope, as cudaSetDevice).
inline thread_local int device_of_launch = 0;
class DeviceScope {
 public:
  explicit DeviceScope(int device) : previous_(device_of_launch) { device_of_launch = device; }
  ~DeviceScope() { device_of_launch = previous_; }

 private:
  int previous_;
};

inline std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(a));
  return buf;
}

inline std::string where_am_i() {
  return " (block " + std::to_string(blockIdx.x) + ", thread " + std::to_string(threadIdx.x) + ")";
}

// Checks one access of `size` bytes at p that must be aligned to `align`; false: not performed.
inline bool access_ok(const void* p, size_t size, size_t align, bool write) {
  LaunchState* s = current_launch;
  if (s == nullptr) return true;  // outside a launch (host code)
  if (s->failed.load(std::memory_order_relaxed)) return false;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % align != 0) {
    s->fail("misaligned address: " + std::string(write ? "store" : "load") + " of " + std::to_string(size) +
            " bytes at " + hex(a) + ", not aligned to " + std::to_string(align) + where_am_i());
    return false;
  }
  if (s->ranges != nullptr) {
    const auto& r = *s->ranges;
    auto it = std::upper_bound(r.begin(), r.end(), std::make_pair(a, ~uintptr_t{0}));
    if (it == r.begin() || a + size > std::prev(it)->second) {
      s->fail("illegal address: " + std::string(write ? "store" : "load") + " of " + std::to_string(size) +
              " bytes at " + hex(a) + " belongs to no tensor of device " + std::to_string(s->device) + where_am_i());
      return false;
    }
  }
  if (s->strict) {
    const int64_t b = blockIdx.x;
    std::lock_guard<std::mutex> lock(s->mu);
    for (uintptr_t g = a / 2; g < (a + size + 1) / 2; ++g) {
      LaunchState::Shadow& e = s->shadow[g];
      const bool other_writer = e.writer >= 0 && e.writer != b;
      const bool other_reader = e.readers || (e.reader >= 0 && e.reader != b);
      if (other_writer || (write && other_reader)) {
        if (!s->failed.load()) {
          s->error = "race between blocks: " + std::string(write ? "store" : "load") + " at " + hex(2 * g) +
                     " by block " + std::to_string(b) + ", " +
                     (other_writer ? "written by block " + std::to_string(e.writer)
                                   : std::string("read by block ") + std::to_string(e.reader)) +
                     " in the same launch";
          s->failed = true;
        }
        return false;
      }
      if (write) {
        e.writer = b;
      } else if (e.reader < 0) {
        e.reader = b;
      } else if (e.reader != b) {
        e.readers = true;
      }
    }
  }
  return true;
}

// Static shared memory of the running kernel (LAF_SHARED): at most 48 KB, as on the GPU.
constexpr size_t kMaxStaticShared = 48 * 1024;
inline void declare_shared(const void* array, size_t bytes) {
  LaunchState* s = current_launch;
  if (s == nullptr) return;
  std::lock_guard<std::mutex> lock(s->mu);
  for (const auto& e : s->shared)
    if (e.first == array) return;
  s->shared.emplace_back(array, bytes);
  size_t total = 0;
  for (const auto& e : s->shared) total += e.second;
  if (total > kMaxStaticShared && !s->failed.load()) {
    s->error = "too many resources requested for launch: " + std::to_string(total) +
               " bytes of static shared memory, more than 48 KB";
    s->failed = true;
  }
}

template <typename T, int N>
inline Vec<T, N> ld(const T* p) {
  Vec<T, N> x{};
  if (!access_ok(p, sizeof x, sizeof x, false)) return x;
  std::memcpy(&x, p, sizeof x);
  traffic.loaded.fetch_add(sizeof x, std::memory_order_relaxed);
  return x;
}
template <typename T, int N>
inline void st(T* p, const Vec<T, N>& x) {
  if (!access_ok(p, sizeof x, sizeof x, true)) return;
  std::memcpy(p, &x, sizeof x);
  traffic.stored.fetch_add(sizeof x, std::memory_order_relaxed);
}
template <typename T>
inline T ld_meta(const T* p) {
  if (!access_ok(p, sizeof(T), alignof(T), false)) return T{};
  traffic.meta_loaded.fetch_add(sizeof(T), std::memory_order_relaxed);
  return *p;
}
template <typename T>
inline void st_meta(T* p, T x) {
  if (!access_ok(p, sizeof(T), alignof(T), true)) return;
  traffic.meta_stored.fetch_add(sizeof(T), std::memory_order_relaxed);
  *p = x;
}

// __syncthreads: a reusable barrier for the threads of the block being run.
class BlockBarrier {
 public:
  explicit BlockBarrier(unsigned n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = generation_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned n_, waiting_ = 0;
  uint64_t generation_ = 0;
};
inline thread_local BlockBarrier* block_barrier = nullptr;

inline void __syncthreads() {
  // A kernel that synchronises must be launched with synchronises=true (threads concurrent).
  if (block_barrier == nullptr) std::terminate();
  block_barrier->arrive_and_wait();
}

struct LaunchStatus {
  LaunchStage stage = LaunchStage::kOk;
  std::string error;
  std::string message(const char* kernel) const { return launch_message(stage, kernel, error); }
};

// The order in which the blocks of the n-th launch run: 0..grid-1, or a permutation seeded by
// the block-order seed and n.
inline std::vector<unsigned> block_order(unsigned grid, uint64_t launch_number) {
  std::vector<unsigned> order(grid);
  for (unsigned b = 0; b < grid; ++b) order[b] = b;
  const uint64_t seed = settings.block_order_seed.load();
  if (seed != 0) {
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + launch_number);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

// Runs the grid on the calling thread, one block after another (in a shuffled order when a
// seed is set). Kernels whose threads synchronise run each block's threads concurrently; the
// others run them in order, which is much cheaper. Returns what cudaGetLastError (and, with
// LOOKAHEAD_FUSED_SYNC_CHECK, cudaStreamSynchronize) would say after the launch.
template <typename Kernel, typename... Args>
LaunchStatus launch(Kernel kernel, unsigned grid, unsigned block, bool synchronises, int64_t /*stream*/,
                    const Args&... args) {
  const uint64_t number = traffic.launches.fetch_add(1, std::memory_order_relaxed);
  LaunchState state;
  state.device = device_of_launch;
  {
    std::lock_guard<std::mutex> lock(settings.mu);
    if (!settings.pending.empty()) {
      LaunchStatus earlier{LaunchStage::kEarlier, settings.pending};
      settings.pending.clear();
      return earlier;
    }
    auto it = settings.ranges.find(state.device);
    if (it != settings.ranges.end()) state.ranges = &it->second;  // not changed during a launch
  }
  state.strict = settings.strict.load();
  constexpr size_t kParamBytes = (sizeof(Args) + ... + size_t{0});
  if (block == 0 || block > 1024 || grid == 0 || grid > 0x7fffffffu)
    return {LaunchStage::kLaunch, "invalid configuration argument: grid " + std::to_string(grid) + ", block " +
                                      std::to_string(block) + " (at most 2^31-1 blocks of 1024 threads)"};
  if (kParamBytes > 4096)
    return {LaunchStage::kLaunch, "too many resources requested for launch: " + std::to_string(kParamBytes) +
                                      " bytes of kernel parameters, more than 4 KB"};
  for (unsigned b : block_order(grid, number)) {
    if (!synchronises) {
      current_launch = &state;
      gridDim.x = grid, blockDim.x = block, blockIdx.x = b;
      for (unsigned t = 0; t < block; ++t) {
        threadIdx.x = t;
        kernel(args...);
      }
      current_launch = nullptr;
    } else {
      BlockBarrier barrier(block);
      std::vector<std::thread> threads;
      threads.reserve(block);
      for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
          current_launch = &state;
          gridDim.x = grid, blockDim.x = block, blockIdx.x = b, threadIdx.x = t;
          block_barrier = &barrier;
          kernel(args...);
          block_barrier = nullptr;
          current_launch = nullptr;
        });
      }
      for (auto& th : threads) th.join();
    }
    if (state.failed.load()) break;  // the first fault ends the launch (on a GPU: the context)
  }
  if (state.failed.load())
    return {sync_check() ? LaunchStage::kSync : LaunchStage::kLaunch, state.error};  // the sync is a no-op
  return {};
}
#endif

}  // namespace lookahead_fused::LAF_NS
