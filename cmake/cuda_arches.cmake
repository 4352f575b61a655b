# The CUDA architectures of the build, from TORCH_CUDA_ARCH_LIST as torch reads it, or a
# default, checked against what this nvcc can build. Included by CMakeLists.txt; also runs
# on its own (tests/test_cuda_build.py), without a project or a compiler check:
#   cmake -DLAF_NVCC=/usr/local/cuda/bin/nvcc -DLAF_ARCH_SPEC="8.6+PTX 9.0a" -P cmake/cuda_arches.cmake
#
# lookahead_fused_cuda_architectures(<nvcc> <spec> <archs_var> <names_var>)
#   <spec>       TORCH_CUDA_ARCH_LIST: entries "X.Y", "X.Ya" (arch-specific features, sm_90a),
#                either with "+PTX", separated by spaces or ';', and torch's names (Turing,
#                Ampere, Ada, Hopper, Blackwell, ...; torch.utils.cpp_extension._get_cuda_arch_flags).
#                Empty: the default, SASS for sm_75 (sm_70 before CUDA 13) to sm_100 where this
#                nvcc builds them, and PTX of the newest for GPUs after it.
#   <archs_var>  CMAKE_CUDA_ARCHITECTURES entries: "90-real" (SASS), "90" (SASS and PTX), "90a-real".
#   <names_var>  what build_info() reports: sm_90, sm_90a, compute_90.
# Entries this nvcc cannot build (nvcc --list-gpu-code / --list-gpu-arch) and entries that
# cannot be read are dropped with a warning; the result may be empty (the caller decides).
# LAF_NVCC_GPU_CODE / LAF_NVCC_GPU_ARCH, when set, stand for nvcc's answers (tests).

cmake_policy(PUSH)
cmake_policy(SET CMP0057 NEW)  # if(IN_LIST) also under cmake -P
function(lookahead_fused_cuda_architectures nvcc spec archs_var names_var)
  if(DEFINED LAF_NVCC_GPU_CODE)
    set(_code "${LAF_NVCC_GPU_CODE}")
    set(_virt "${LAF_NVCC_GPU_ARCH}")
  else()
    execute_process(COMMAND "${nvcc}" --list-gpu-code OUTPUT_VARIABLE _code RESULT_VARIABLE _rc1 ERROR_QUIET)
    execute_process(COMMAND "${nvcc}" --list-gpu-arch OUTPUT_VARIABLE _virt RESULT_VARIABLE _rc2 ERROR_QUIET)
    if(NOT _rc1 EQUAL 0 OR NOT _rc2 EQUAL 0)
      message(WARNING "lookahead_fused: '${nvcc} --list-gpu-code' failed: no CUDA architectures")
      set(${archs_var} "" PARENT_SCOPE)
      set(${names_var} "" PARENT_SCOPE)
      return()
    endif()
  endif()
  string(STRIP "${_code}" _code)
  string(STRIP "${_virt}" _virt)
  string(REGEX REPLACE "[ \t\r\n;]+" ";" _code "${_code}")
  string(REGEX REPLACE "[ \t\r\n;]+" ";" _virt "${_virt}")
  list(JOIN _code " " _code_text)

  string(STRIP "${spec}" spec)
  if(spec STREQUAL "")
    # The default: every major architecture this nvcc builds, PTX of the newest.
    if("sm_70" IN_LIST _code)
      set(spec "7.0")
    else()
      set(spec "7.5")  # CUDA 13 dropped Volta
    endif()
    # (sm_120 is not in the default yet: ptxas 13.0 spills 4 bytes in a few step-kernel
    # variants for it; TORCH_CUDA_ARCH_LIST=12.0 builds it.)
    set(_candidates 8.0 8.6 8.9 9.0 10.0)
    set(_newest "")
    foreach(_c IN LISTS _candidates)
      string(REPLACE "." "" _n "${_c}")
      if("sm_${_n}" IN_LIST _code)
        string(APPEND spec " ${_c}")
        set(_newest "${_c}")
      endif()
    endforeach()
    if(_newest)
      string(REPLACE " ${_newest}" " ${_newest}+PTX" spec "${spec}")
    endif()
  endif()

  # torch's syntax: ' ' or ';' between entries, names expanded (combined names first).
  string(REPLACE " " ";" spec "${spec}")
  foreach(_pair "Kepler+Tesla=3.7" "Kepler=3.5+PTX" "Maxwell+Tegra=5.3" "Maxwell=5.0;5.2+PTX" "Pascal=6.0;6.1+PTX"
                "Volta+Tegra=7.2" "Volta=7.0+PTX" "Turing=7.5+PTX" "Ampere+Tegra=8.7" "Ampere=8.0;8.6+PTX"
                "Ada=8.9+PTX" "Hopper=9.0+PTX" "Blackwell+Tegra=11.0" "Blackwell=10.0;10.3;12.0;12.1+PTX")
    string(FIND "${_pair}" "=" _eq)
    string(SUBSTRING "${_pair}" 0 ${_eq} _name)
    math(EXPR _eq "${_eq} + 1")
    string(SUBSTRING "${_pair}" ${_eq} -1 _value)
    string(REPLACE "${_name}" "${_value}" spec "${spec}")
  endforeach()

  set(_archs "")
  set(_names "")
  foreach(_e IN LISTS spec)
    if(_e STREQUAL "")
      continue()
    endif()
    string(REGEX MATCH "^([0-9]+)\\.([0-9])(a?)(\\+PTX)?$" _m "${_e}")
    if(NOT _m)
      message(WARNING "lookahead_fused: TORCH_CUDA_ARCH_LIST entry '${_e}' is not an architecture "
                      "(expected e.g. 8.0, 9.0a, 8.6+PTX or a name such as Hopper): ignored")
      continue()
    endif()
    set(_n "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
    set(_a "${CMAKE_MATCH_3}")
    set(_ptx "${CMAKE_MATCH_4}")
    # nvcc lists no "a" targets: arch-specific variants exist from sm_90 on, where the base exists.
    if(NOT "sm_${_n}" IN_LIST _code OR (_a AND CMAKE_MATCH_1 LESS 9))
      message(WARNING "lookahead_fused: this nvcc cannot build sm_${_n}${_a} (TORCH_CUDA_ARCH_LIST entry "
                      "'${_e}'; it builds ${_code_text}): ignored")
      continue()
    endif()
    if(_ptx AND NOT "compute_${_n}" IN_LIST _virt)
      message(WARNING "lookahead_fused: this nvcc cannot build PTX for compute_${_n}${_a}: SASS only")
      set(_ptx "")
    endif()
    list(APPEND _names "sm_${_n}${_a}")
    if(_ptx)
      list(APPEND _archs "${_n}${_a}")
      list(APPEND _names "compute_${_n}${_a}")
    else()
      list(APPEND _archs "${_n}${_a}-real")
    endif()
  endforeach()
  # One entry per architecture: "90" (SASS and PTX) absorbs "90-real".
  foreach(_e IN LISTS _archs)
    string(REPLACE "-real" "" _base "${_e}")
    if(NOT _e STREQUAL _base AND _base IN_LIST _archs)
      list(REMOVE_ITEM _archs "${_e}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES _archs)
  list(REMOVE_DUPLICATES _names)
  set(${archs_var} "${_archs}" PARENT_SCOPE)
  set(${names_var} "${_names}" PARENT_SCOPE)
endfunction()
cmake_policy(POP)

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)  # cmake -P: print the result
  lookahead_fused_cuda_architectures("${LAF_NVCC}" "${LAF_ARCH_SPEC}" _archs _names)
  message(STATUS "CUDA_ARCHITECTURES=${_archs}")
  message(STATUS "ARCH_NAMES=${_names}")
endif()
