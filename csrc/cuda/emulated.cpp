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
