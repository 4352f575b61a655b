// The one pybind11 front file of lookahead_fused._C. Everything crosses as plain integers
// (addresses), doubles and bools, never at::Tensor: _C does not link against torch, so one
// build serves every torch version (DESIGN.md §4).
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "cuda/lookahead_kernels.h"

namespace py = pybind11;
using namespace lookahead_fused::cpu;

namespace {

// The CPU kernels' ISA levels (csrc/cpu_kernels.h): built, runnable here, selected.
py::list cpu_isa_list(bool supported_only) {
  py::list names;
  for (int i = 0; i < isa_count(); ++i)
    if (!supported_only || isa_info(i).supported) names.append(isa_info(i).name);
  return names;
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = LOOKAHEAD_FUSED_COMPILER;  // "<CMake compiler id> <version>"
  info["flags"] = LOOKAHEAD_FUSED_CXX_FLAGS;
  info["cpu_kernel_flags"] = LOOKAHEAD_FUSED_CPU_KERNEL_FLAGS;  // plus each level's -march=
  info["cpu_arch"] = LOOKAHEAD_FUSED_CPU_ARCH;                  // "dispatch", or the -march= of one build
  info["cpu_isas"] = cpu_isa_list(false);                       // the levels built, lowest first
  info["cpu_isas_supported"] = cpu_isa_list(true);              // those this CPU runs
  const IsaInfo selected = isa_info(selected_isa());
  info["cpu_isa"] = selected.name;  // the level the kernels run
  info["simd"] = selected.simd;     // its widest SIMD extension
#if defined(_OPENMP)
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;  // built without OpenMP (CMakeLists.txt): the CPU kernels run on one thread
  info["openmp_max_threads"] = 1;
#endif
#if defined(LOOKAHEAD_FUSED_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_architectures"] = std::vector<std::string>{LOOKAHEAD_FUSED_CUDA_ARCHITECTURES};
#else
  info["cuda"] = false;
  info["cuda_architectures"] = std::vector<std::string>{};
#endif
  info["cuda_emulated"] = true;  // csrc/cuda/emulated.cpp: the CUDA kernels compiled for the host
  return info;
}

// The CUDA kernels' entry points for one build (GPU or host emulation), under a prefix.
template <void (*kStep)(const lookahead_fused::gpu::LaunchArgs&),
          void (*kFinalize)(const lookahead_fused::gpu::FinalizeArgs&)>
void def_kernel_api(py::module_& m, const std::string& prefix, const char* what) {
  using lookahead_fused::gpu::FinalizeArgs;
  using lookahead_fused::gpu::LaunchArgs;
  m.def((prefix + "step").c_str(),
        [](const LaunchArgs& a) {
          py::gil_scoped_release no_gil;
          kStep(a);
        },
        py::arg("args"), (std::string("One fused step of one bucket: ") + what).c_str());
  m.def((prefix + "finalize_alpha").c_str(),
        [](const FinalizeArgs& a) {
          py::gil_scoped_release no_gil;
          kFinalize(a);
        },
        py::arg("args"), "Adaptive alpha of a group from its buckets' partial sums (device-side).");
}

void def_gpu_interface(py::module_& m) {
  namespace gpu = lookahead_fused::gpu;
  py::enum_<gpu::Phase>(m, "LaunchPhase")
      .value("step", gpu::Phase::kStep)
      .value("inner_dots", gpu::Phase::kInnerDots)
      .value("sync_only", gpu::Phase::kSyncOnly);

#define LAF_FIELD(name) .def_readwrite(#name, &gpu::LaunchArgs::name)
  py::class_<gpu::LaunchArgs>(m, "LaunchArgs", "Device addresses, sizes and hyperparameters of one bucket's launch.")
      .def(py::init<>())  //
      LAF_FIELD(segments) LAF_FIELD(num_segments) LAF_FIELD(chunks) LAF_FIELD(num_chunks) LAF_FIELD(chunk_size)
          LAF_FIELD(grid) LAF_FIELD(block) LAF_FIELD(kind) LAF_FIELD(phase) LAF_FIELD(inner_state)
              LAF_FIELD(param_dtype) LAF_FIELD(state_dtype) LAF_FIELD(slow_dtype) LAF_FIELD(momentum)
                  LAF_FIELD(exp_avg_sq) LAF_FIELD(max_exp_avg_sq) LAF_FIELD(cached_momentum) LAF_FIELD(slow)
                      LAF_FIELD(step) LAF_FIELD(lookahead_step) LAF_FIELD(lr_ptr) LAF_FIELD(lr_is_double)
                          LAF_FIELD(grad_scale_ptr) LAF_FIELD(found_inf_ptr) LAF_FIELD(alpha_ptr) LAF_FIELD(partials)
                              LAF_FIELD(lr) LAF_FIELD(momentum_coef) LAF_FIELD(dampening) LAF_FIELD(weight_decay)
                                  LAF_FIELD(nesterov) LAF_FIELD(maximize) LAF_FIELD(amsgrad) LAF_FIELD(beta1)
                                      LAF_FIELD(beta2) LAF_FIELD(eps) LAF_FIELD(alpha) LAF_FIELD(k)
                                          LAF_FIELD(advance_counters) LAF_FIELD(stream) LAF_FIELD(device);
#undef LAF_FIELD
  py::class_<gpu::FinalizeArgs>(m, "FinalizeArgs", "Inputs of adaptive alpha's second reduction stage.")
      .def(py::init<>())
      .def_readwrite("partials", &gpu::FinalizeArgs::partials)
      .def_readwrite("num_partials", &gpu::FinalizeArgs::num_partials)
      .def_readwrite("alpha", &gpu::FinalizeArgs::alpha)
      .def_readwrite("alpha_low", &gpu::FinalizeArgs::alpha_low)
      .def_readwrite("alpha_out", &gpu::FinalizeArgs::alpha_out)
      .def_readwrite("stream", &gpu::FinalizeArgs::stream)
      .def_readwrite("device", &gpu::FinalizeArgs::device);

  namespace emu = lookahead_fused::emulated;
  def_kernel_api<&emu::step, &emu::finalize_alpha>(m, "emulated_", "the CUDA kernels run on CPU memory");
  m.def(
      "emulated_traffic",
      [] {
        const emu::TrafficCounts t = emu::traffic_counts();
        py::dict d;
        d["loaded"] = t.loaded;
        d["stored"] = t.stored;
        d["meta_loaded"] = t.meta_loaded;
        d["meta_stored"] = t.meta_stored;
        d["launches"] = t.launches;
        return d;
      },
      "Bytes the emulated kernels loaded and stored since the last reset: per element (loaded, stored), "
      "per chunk (meta_loaded, meta_stored: chunk table, counters, device scalars), and launches.");
  m.def("emulated_traffic_reset", &emu::traffic_reset, "Zero the emulated kernels' traffic counters.");
  m.def("emulated_set_block_order_seed", &emu::set_block_order_seed, py::arg("seed"),
        "Run the blocks of every emulated launch in an order shuffled by this seed (0: in order).");
  m.def("emulated_block_order_seed", &emu::block_order_seed, "The block-order seed (0: in order).");
  m.def("emulated_set_strict", &emu::set_strict, py::arg("on"),
        "Race detector: an address one block writes and another touches in the same launch fails it.");
  m.def("emulated_strict", &emu::strict, "Whether the race detector is on.");
  m.def("emulated_set_device_ranges", &emu::set_device_ranges, py::arg("device"), py::arg("ranges"),
        "The (address, bytes) of every tensor of emulated device `device`: an access elsewhere fails the launch.");
  m.def("emulated_clear_device_ranges", &emu::clear_device_ranges, py::arg("device"),
        "Stop checking addresses of emulated device `device`.");
  m.def("emulated_set_pending_error", &emu::set_pending_error, py::arg("error"),
        "Make the next emulated launch find this error pending from earlier work (tests of the error path).");
  m.def("emulated_sync_check", &emu::sync_check_enabled,
        "Whether LOOKAHEAD_FUSED_SYNC_CHECK is set (read once): launches synchronise their stream.");
  m.def(
      "emulated_selftest",
      [](const std::string& name) {
        py::gil_scoped_release no_gil;
        return emu::selftest(name);
      },
      py::arg("name"), "Run a small emulated kernel that misbehaves on purpose (tests/test_emulation.py).");
#if defined(LOOKAHEAD_FUSED_WITH_CUDA)
  namespace cu = lookahead_fused::cuda;
  def_kernel_api<&cu::step, &cu::finalize_alpha>(m, "cuda_", "CUDA kernels on the given stream");
  m.def(
      "cuda_kernel_unavailable",
      [](int device) {
        py::gil_scoped_release no_gil;
        return cu::kernel_unavailable(device);
      },
      py::arg("device"), "Why the CUDA kernels cannot run on this device ('' when they can).");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lookahead_fused compiled kernels (raw-pointer interface; see lookahead_fused/backends/cpu.py)";
  m.def("build_info", &build_info, "What this build of _C contains: compiler, flags, SIMD level, OpenMP, CUDA.");

  py::enum_<Kind>(m, "Kind").value("sgd", Kind::kSgd).value("adam", Kind::kAdam).value("adamw", Kind::kAdamW);
  py::enum_<Phase>(m, "Phase")
      .value("plain", Phase::kPlain)
      .value("sync", Phase::kSync)
      .value("inner_dots", Phase::kInnerDots)
      .value("sync_only", Phase::kSyncOnly);
  py::enum_<InnerState>(m, "InnerState")
      .value("maintain", InnerState::kMaintain)
      .value("reset", InnerState::kReset)
      .value("pullback", InnerState::kPullback);
  py::enum_<DType>(m, "DType")
      .value("float32", DType::kFloat32)
      .value("bfloat16", DType::kBFloat16)
      .value("float16", DType::kFloat16);

  py::class_<StepArgs>(m, "StepArgs", "Addresses, sizes and hyperparameters of one bucket's step.")
      .def(py::init<>())
      .def_readwrite("table", &StepArgs::table)
      .def_readwrite("num_segments", &StepArgs::num_segments)
      .def_readwrite("numel", &StepArgs::numel)
      .def_readwrite("chunk", &StepArgs::chunk)
      .def_readwrite("kind", &StepArgs::kind)
      .def_readwrite("phase", &StepArgs::phase)
      .def_readwrite("inner_state", &StepArgs::inner_state)
      .def_readwrite("param_dtype", &StepArgs::param_dtype)
      .def_readwrite("state_dtype", &StepArgs::state_dtype)
      .def_readwrite("slow_dtype", &StepArgs::slow_dtype)
      .def_readwrite("momentum", &StepArgs::momentum)
      .def_readwrite("exp_avg_sq", &StepArgs::exp_avg_sq)
      .def_readwrite("max_exp_avg_sq", &StepArgs::max_exp_avg_sq)
      .def_readwrite("cached_momentum", &StepArgs::cached_momentum)
      .def_readwrite("slow", &StepArgs::slow)
      .def_readwrite("step", &StepArgs::step)
      .def_readwrite("lr", &StepArgs::lr)
      .def_readwrite("momentum_coef", &StepArgs::momentum_coef)
      .def_readwrite("dampening", &StepArgs::dampening)
      .def_readwrite("weight_decay", &StepArgs::weight_decay)
      .def_readwrite("nesterov", &StepArgs::nesterov)
      .def_readwrite("maximize", &StepArgs::maximize)
      .def_readwrite("amsgrad", &StepArgs::amsgrad)
      .def_readwrite("beta1", &StepArgs::beta1)
      .def_readwrite("beta2", &StepArgs::beta2)
      .def_readwrite("eps", &StepArgs::eps)
      .def_readwrite("alpha", &StepArgs::alpha)
      .def_readwrite("grad_scale", &StepArgs::grad_scale);

  m.def(
      "cpu_isa", [] { return std::string(isa_info(selected_isa()).name); },
      "The ISA level the CPU kernels run (the highest this CPU supports unless cpu_set_isa chose one).");
  m.def(
      "cpu_set_isa", [](const std::string& name) { select_isa(name.c_str()); }, py::arg("name"),
      "Run the CPU kernels of this ISA level from now on (tests compare the levels); ValueError for a level "
      "not built or one this CPU lacks.");

  m.def(
      "lookahead_step",
      [](const StepArgs& args) {
        StepResult r;
        {
          py::gil_scoped_release no_gil;
          r = lookahead_step(args);
        }
        return py::make_tuple(r.g_dot_d, r.d_a_d);
      },
      py::arg("args"),
      "One fused step of one bucket; returns (g·d, dᵀÂd), the adaptive-α sums (zeros unless phase=inner_dots).");

  def_gpu_interface(m);

  m.def(
      "stream_floor",
      [](const std::vector<int64_t>& buffers, int writes, int64_t n, int64_t chunk) {
        py::gil_scoped_release no_gil;
        stream_floor(buffers.data(), static_cast<int>(buffers.size()), writes, n, chunk);
      },
      py::arg("buffers"), py::arg("writes"), py::arg("n"), py::arg("chunk") = 1 << 16,
      "Stream over fp32 buffers (addresses) of n elements: read all, write the first `writes` back.");
}
