#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (idempotent: quick when nothing changed),
# check every backend usable on this device against the reference, then benchmark.
#   bash run.sh                      # check + the short benchmark (ResNet-50 set, the fused class,
#                                    # torch's fused optimizer, the floor: ~1 min, < 3 GB on a CPU;
#                                    # 2.6 min with a fresh set-up on 2 cores)
#   bash run.sh --full               # check + every contender on the ResNet-152 set (~10 min, ~8 GB)
#   bash run.sh --set gpt2 ...       # other arguments go to `python -m bench` in place of --short
# test.sh sources this file for setup_env and friends; main runs only when executed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python
TORCH_VERSION=2.13.0
# The build backend (scikit-build-core, pyproject.toml) and what it runs for the CMake-built
# extension lookahead_fused._C. They go into the venv first because the project installs with
# --no-build-isolation: an isolated build environment would not see the torch already
# installed, and must not download a CUDA torch itself. (torch is no build requirement.)
BUILD_DEPS=("scikit-build-core>=0.11" "pybind11>=2.10" "cmake>=3.18" ninja)
# What the installed project depends on: a change to any of these reinstalls it (and lets
# `pip install -e` rebuild _C, incrementally, in build/<wheel tag>); other Python sources need
# nothing, the install is editable. lookahead_fused/__init__.py holds the version.
BUILD_INPUTS=(pyproject.toml CMakeLists.txt cmake csrc lookahead_fused/__init__.py)
# Environment variables the build reads (docs/building.md): a change reinstalls too.
BUILD_ENV=(CMAKE_ARGS LOOKAHEAD_FUSED_CPU_ARCH LOOKAHEAD_FUSED_CUDA LOOKAHEAD_FUSED_TENSOR_KEYS TORCH_CUDA_ARCH_LIST CUDACXX)

# Prints one hash of the contents and names of the given files and folders (missing ones skipped).
inputs_hash() {
    local existing=()
    for path in "$@"; do
        [ -e "$ROOT/$path" ] && existing+=("$path")
    done
    [ ${#existing[@]} -gt 0 ] || { echo none; return; }
    (cd "$ROOT" && find "${existing[@]}" -type f -print0 | sort -z | xargs -0 -r sha256sum | sha256sum | cut -c1-64)
}

# stamped NAME HASH COMMAND...: runs COMMAND unless the last successful run of NAME had the same HASH.
stamped() {
    local stamp=$VENV/.stamp-$1 hash=$2
    shift 2
    [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] && return 0
    "$@"
    echo "$hash" >"$stamp"
}

ensure_torch() {
    # Reuse any torch the system python has (--system-site-packages), e.g. a CUDA build;
    # otherwise the CPU build, not the multi-GB CUDA one that PyPI would give.
    "$PY" -c "import torch" 2>/dev/null && return 0
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        echo "run.sh: no torch importable; installing torch==$TORCH_VERSION from $TORCH_INDEX_URL" >&2
    else
        # What pip takes is what its configured index has: on Linux, PyPI's default torch wheel
        # is the CUDA build (several GB); a local wheel or index configured for pip wins.
        echo "run.sh: no torch importable; installing torch==$TORCH_VERSION from pip's configured index" \
            "(PyPI's Linux wheel is the CUDA build, several GB; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" \
            "gives the CPU-only one)" >&2
    fi
    # TORCH_INDEX_URL picks where the wheel comes from (e.g. PyTorch's CPU wheel index, for a
    # CPU-only build on a machine whose default index only has the CUDA one).
    "$PY" -m pip install "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
}

# The one place that installs the project: adjust build flags here.
install_project() {
    "$PY" -m pip install --quiet "${BUILD_DEPS[@]}"
    # The tests need _C (cpu, cuda_emulated): here a failed build is an error, not the
    # pure-Python fallback a plain `pip install` takes (pyproject.toml).
    # Likewise _tensor_keys (the C++ layout keys; the build sees this torch): required here.
    LOOKAHEAD_FUSED_TENSOR_KEYS=${LOOKAHEAD_FUSED_TENSOR_KEYS:-ON} \
        LOOKAHEAD_FUSED_REQUIRE_EXTENSION=${LOOKAHEAD_FUSED_REQUIRE_EXTENSION:-1} "$PY" -m pip install --quiet --no-build-isolation -e "$ROOT[test]"
}

# One line naming the build's environment variables that are set, with their values.
build_env() {
    local name
    for name in "${BUILD_ENV[@]}"; do
        [ -n "${!name:-}" ] && printf -- '-%s=%s' "$name" "${!name}"
    done
    return 0
}

setup_env() {
    [ -x "$PY" ] || python3 -m venv --system-site-packages "$VENV"
    ensure_torch
    # The build's environment (CMAKE_ARGS and the rest of BUILD_ENV) is an input too, and so
    # is torch's version: lookahead_fused._tensor_keys is built against it (docs/building.md).
    local torch_version
    torch_version=$("$PY" -c "import torch; print(torch.__version__)")
    stamped project "$(inputs_hash "${BUILD_INPUTS[@]}")$(build_env)-torch=$torch_version" install_project
}

# Prints OFF when the main job should build _C without its CUDA kernels: LOOKAHEAD_FUSED_CUDA
# is not set and torch sees no GPU (a CPU-only torch, or no GPU). Nothing here could run them,
# and a fresh set-up takes about 1.5 minutes less on 2 cores. test.sh builds them always (the
# tests read their machine code); LOOKAHEAD_FUSED_CUDA=AUTO (or ON) asks for them here.
main_cuda_setting() {
    [ -z "${LOOKAHEAD_FUSED_CUDA:-}" ] || return 0
    "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || echo OFF
}

main() {
    [ -x "$PY" ] || python3 -m venv --system-site-packages "$VENV"
    ensure_torch
    if [ "$(main_cuda_setting)" = OFF ]; then
        echo "run.sh: torch sees no GPU: building lookahead_fused._C without its CUDA kernels (LOOKAHEAD_FUSED_CUDA=OFF)" >&2
        export LOOKAHEAD_FUSED_CUDA=OFF
    fi
    setup_env
    cd "$ROOT"
    "$PY" -m lookahead_fused check
    if [ "${1:-}" = "--full" ]; then
        shift
        "$PY" -m bench "$@"
    elif [ $# -gt 0 ]; then
        "$PY" -m bench "$@"
    else
        "$PY" -m bench --short
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
