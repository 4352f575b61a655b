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
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LAF_NS cuda
#define LAF_DEVICE __device__ __forceinline__
#define LAF_UNROLL _Pragma("unroll")
#else
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
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
#endif

namespace lookahead_fused::LAF_NS {

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

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, unsigned grid, unsigned block, bool /*synchronises*/, int64_t stream,
                   const Args&... args) {
  kernel<<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(args...);
  return cudaGetLastError();
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

template <typename T, int N>
inline Vec<T, N> ld(const T* p) {
  Vec<T, N> x;
  std::memcpy(&x, p, sizeof x);
  traffic.loaded.fetch_add(sizeof x, std::memory_order_relaxed);
  return x;
}
template <typename T, int N>
inline void st(T* p, const Vec<T, N>& x) {
  std::memcpy(p, &x, sizeof x);
  traffic.stored.fetch_add(sizeof x, std::memory_order_relaxed);
}
template <typename T>
inline T ld_meta(const T* p) {
  traffic.meta_loaded.fetch_add(sizeof(T), std::memory_order_relaxed);
  return *p;
}
template <typename T>
inline void st_meta(T* p, T x) {
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

// Runs the grid on the calling thread (blocks in order). Kernels whose threads synchronise run
// each block's threads concurrently; the others run them in order, which is much cheaper.
// Returns an error message ("" when the kernel ran), like cudaGetLastError after a launch.
template <typename Kernel, typename... Args>
const char* launch(Kernel kernel, unsigned grid, unsigned block, bool synchronises, int64_t /*stream*/,
                   const Args&... args) {
  traffic.launches.fetch_add(1, std::memory_order_relaxed);
  for (unsigned b = 0; b < grid; ++b) {
    if (!synchronises) {
      gridDim.x = grid, blockDim.x = block, blockIdx.x = b;
      for (unsigned t = 0; t < block; ++t) {
        threadIdx.x = t;
        kernel(args...);
      }
      continue;
    }
    BlockBarrier barrier(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        gridDim.x = grid, blockDim.x = block, blockIdx.x = b, threadIdx.x = t;
        block_barrier = &barrier;
        kernel(args...);
        block_barrier = nullptr;
      });
    }
    for (auto& th : threads) th.join();
  }
  return "";
}

#endif

}  // namespace lookahead_fused::LAF_NS
