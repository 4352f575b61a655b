// The backend "cuda_emulated": csrc/cuda/lookahead_kernels.cu compiled by the host compiler.
// csrc/cuda_compat.h turns the kernels into plain functions and launches into loops over
// blocks and threads (DESIGN.md §5), and counts the bytes every kernel loads and stores.
#include "lookahead_kernels.cu"

namespace lookahead_fused::emulated {

TrafficCounts traffic_counts() {
  return TrafficCounts{traffic.loaded.load(), traffic.stored.load(), traffic.meta_loaded.load(),
                       traffic.meta_stored.load(), traffic.launches.load()};
}

void traffic_reset() {
  traffic.loaded = 0;
  traffic.stored = 0;
  traffic.meta_loaded = 0;
  traffic.meta_stored = 0;
  traffic.launches = 0;
}

}  // namespace lookahead_fused::emulated

// ---------------------------------------------------------------------------------------
// The emulated device's settings (bindings.cpp: emulated_set_*), and small kernels that
// misbehave on purpose so that tests/test_emulation.py sees every check of cuda_compat.h fire.
// ---------------------------------------------------------------------------------------

namespace lookahead_fused::emulated {

void set_block_order_seed(uint64_t seed) { settings.block_order_seed = seed; }
uint64_t block_order_seed() { return settings.block_order_seed.load(); }
void set_strict(bool on) { settings.strict = on; }
bool strict() { return settings.strict.load(); }
bool sync_check_enabled() { return sync_check(); }

void set_device_ranges(int device, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  std::vector<std::pair<uintptr_t, uintptr_t>> r;
  r.reserve(ranges.size());
  for (const auto& [begin, bytes] : ranges) {
    if (bytes < 0) throw std::invalid_argument("negative range size");
    if (bytes > 0) r.emplace_back(static_cast<uintptr_t>(begin), static_cast<uintptr_t>(begin + bytes));
  }
  std::sort(r.begin(), r.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> merged;  // overlapping views of one storage: one range
  for (const auto& e : r) {
    if (!merged.empty() && e.first <= merged.back().second) {
      merged.back().second = std::max(merged.back().second, e.second);
    } else {
      merged.push_back(e);
    }
  }
  std::lock_guard<std::mutex> lock(settings.mu);
  settings.ranges[device] = std::move(merged);
}

void clear_device_ranges(int device) {
  std::lock_guard<std::mutex> lock(settings.mu);
  settings.ranges.erase(device);
}

void set_pending_error(const std::string& error) {
  std::lock_guard<std::mutex> lock(settings.mu);
  settings.pending = error;
}

namespace {

struct SelfArgs {
  float* buf;    // registered for the self-test's device: n floats, 16-byte aligned
  float* other;  // not registered
  int64_t n;
};

void aligned_kernel(SelfArgs a) {  // the control: every thread its own aligned vector
  const int64_t i = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (i + 4 <= a.n) st<float, 4>(a.buf + i, ld<float, 4>(a.buf + i));
}
void misaligned_kernel(SelfArgs a) {
  if (blockIdx.x == 0 && threadIdx.x == 0) st<float, 4>(a.buf + 1, ld<float, 4>(a.buf + 1));
}
void race_write_kernel(SelfArgs a) {  // every block writes the same vector
  if (threadIdx.x == 0) st<float, 4>(a.buf, Vec<float, 4>{});
}
void race_read_kernel(SelfArgs a) {  // block 0 writes what the others read
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 0) {
    st<float, 4>(a.buf, Vec<float, 4>{});
  } else {
    ld<float, 4>(a.buf);
  }
}
void race_meta_kernel(SelfArgs a) {  // a counter every block advances
  if (threadIdx.x == 0) st_meta(a.buf + 8, ld_meta(a.buf + 8) + 1.0f);
}
void illegal_kernel(SelfArgs a) {
  if (blockIdx.x == 0 && threadIdx.x == 0) ld<float, 4>(a.other);
}
void out_of_bounds_kernel(SelfArgs a) {  // one vector past the end of the buffer
  if (blockIdx.x == 0 && threadIdx.x == 0) ld<float, 4>(a.buf + a.n);
}
void shared_kernel(SelfArgs) {  // 2 x 32 KB of static shared memory
  LAF_SHARED(double, first, 4096);
  LAF_SHARED(double, second, 4096);
  first[threadIdx.x] = second[threadIdx.x] = 0.0;
}
struct BigArgs {
  char bytes[4100];
};
void big_params_kernel(BigArgs) {}

}  // namespace

std::string selftest(const std::string& name) {
  constexpr int kDevice = 1000;  // a device of its own: its ranges disturb no other launch
  constexpr int64_t n = 1024;
  std::vector<Vec<float, 4>> buf(n / 4), other(4);
  SelfArgs a{reinterpret_cast<float*>(buf.data()), reinterpret_cast<float*>(other.data()), n};
  set_device_ranges(kDevice, {{reinterpret_cast<int64_t>(a.buf), n * 4}});
  const bool was_strict = strict();
  const bool race = name.rfind("race", 0) == 0;
  if (race) set_strict(true);
  struct Restore {
    bool strict;
    ~Restore() {
      set_strict(strict);
      clear_device_ranges(kDevice);
    }
  } restore{was_strict};
  DeviceScope device(kDevice);
  const std::string kernel = "selftest " + name;
  auto run = [&](auto k, unsigned grid, unsigned block, const auto& args) {
    check_launch(launch(k, grid, block, false, 0, args), kernel.c_str());
  };
  if (name == "aligned") {
    run(aligned_kernel, 4, 64, a);
  } else if (name == "misaligned") {
    run(misaligned_kernel, 2, 32, a);
  } else if (name == "race_write") {
    run(race_write_kernel, 3, 32, a);
  } else if (name == "race_read") {
    run(race_read_kernel, 3, 32, a);
  } else if (name == "race_meta") {
    run(race_meta_kernel, 3, 32, a);
  } else if (name == "illegal_address") {
    run(illegal_kernel, 1, 32, a);
  } else if (name == "out_of_bounds") {
    run(out_of_bounds_kernel, 1, 32, a);
  } else if (name == "shared_memory") {
    check_launch(launch(shared_kernel, 1, 32, true, 0, a), kernel.c_str());
  } else if (name == "block_size") {
    run(aligned_kernel, 1, 2048, a);
  } else if (name == "grid_size") {
    run(aligned_kernel, 0x80000000u, 32, a);
  } else if (name == "kernel_params") {
    run(big_params_kernel, 1, 32, BigArgs{});
  } else {
    throw std::invalid_argument("no self-test " + name);
  }
  return "";
}

}  // namespace lookahead_fused::emulated
