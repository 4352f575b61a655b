// From the runtime description of a step to the compile-time variant of the one kernel body,
// written once for the CPU and CUDA builds. Each build then switches on its own phases.
//
//   with_inner(kind, momentum, amsgrad, fn)   calls fn(adam, has_momentum, amsgrad) with
//       std::true_type / std::false_type arguments: SGD without or with a momentum buffer,
//       Adam/AdamW (AdamW differs only in runtime scalars) without or with amsgrad;
//   with_storage<P>(state, slow, param, fn)   calls fn(type_tag<S>{}, type_tag<F>{}) with the
//       storage types of the state and the slow weights: fp32 or the parameter's own.
#pragma once

#include <stdexcept>
#include <type_traits>

#include "cpu_kernels.h"  // Kind, DType

namespace lookahead_fused {

template <typename T>
struct type_tag {
  using type = T;
};

template <typename Fn>
decltype(auto) with_inner(cpu::Kind kind, bool momentum, bool amsgrad, Fn&& fn) {
  using T = std::true_type;
  using N = std::false_type;
  if (kind == cpu::Kind::kSgd) return momentum ? fn(N{}, T{}, N{}) : fn(N{}, N{}, N{});
  return amsgrad ? fn(T{}, T{}, T{}) : fn(T{}, T{}, N{});
}

template <typename P, typename Fn>
decltype(auto) with_storage(cpu::DType state, cpu::DType slow, cpu::DType param, Fn&& fn) {
  const bool s32 = state == cpu::DType::kFloat32, f32 = slow == cpu::DType::kFloat32;
  if ((!s32 && state != param) || (!f32 && slow != param))
    throw std::invalid_argument("state and slow weights must be float32 or the parameter's dtype");
  if constexpr (std::is_same_v<P, float>) {
    return fn(type_tag<float>{}, type_tag<float>{});
  } else {
    if (s32 && f32) return fn(type_tag<float>{}, type_tag<float>{});
    if (s32) return fn(type_tag<float>{}, type_tag<P>{});
    if (f32) return fn(type_tag<P>{}, type_tag<float>{});
    return fn(type_tag<P>{}, type_tag<P>{});
  }
}

}  // namespace lookahead_fused
