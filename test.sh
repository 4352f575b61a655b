#!/usr/bin/env bash
# The tests on a fresh machine: sets up .venv as run.sh does (idempotent), then runs
#   pytest -q tests bench "$@"  with TRITON_INTERPRET=1 (Triton kernels run on CPU tensors);
#                               bench/ runs its pytest-benchmark suite once, untimed
#   ruff check / ruff format --check over the Python sources
#   mypy over lookahead_fused/ (its settings: pyproject.toml's [tool.mypy])
#   clang-format --dry-run -Werror over csrc/ (the style in .clang-format)
# installing Debian's qemu-user first where it can (root with apt-get), for the ISA test;
# and fails when any of them fails, or when pytest collected no test at all.
#   bash test.sh                        # everything
#   bash test.sh -k adam -x             # arguments go to pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/run.sh"

setup_env
stamped dev "$(inputs_hash requirements-dev.txt)" "$PY" -m pip install --quiet -r "$ROOT/requirements-dev.txt"
# timm without its dependencies: they include torchvision, whose PyPI build does not import
# beside this torch (requirements-dev.txt says more); timm.optim needs none of them.
TIMM_VERSION=1.0.31
stamped timm "$TIMM_VERSION" "$PY" -m pip install --quiet --no-deps "timm==$TIMM_VERSION"
# QEMU's user-mode emulator runs the package on CPUs without AVX-512 or AVX
# (tests/test_cpu_isa_emulated.py): Debian's qemu-user, installed where this user can
# (root with apt-get); elsewhere that test skips and says why, except under
# LOOKAHEAD_FUSED_REQUIRE_QEMU=1 (.ci/run), where it fails.
ensure_qemu() {
    command -v qemu-x86_64 >/dev/null && return 0
    [ "$(uname -m)" = x86_64 ] || return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing qemu-user (Debian) for tests/test_cpu_isa_emulated.py" >&2
        local apt=(apt-get install -y -qq --no-install-recommends qemu-user)
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; } ||
            echo "test.sh: could not install qemu-user" >&2
    else
        echo "test.sh: qemu-x86_64 not found and not installable here (needs root and apt-get):" \
            "tests/test_cpu_isa_emulated.py will skip" >&2
    fi
}
ensure_qemu
cd "$ROOT"
export TRITON_INTERPRET=1

failed=()
# Python sources only: recent ruff also formats the code blocks of Markdown files.
"$PY" -m ruff check --extend-exclude '*.md' . || failed+=("ruff check")
"$PY" -m ruff format --check --extend-exclude '*.md' . || failed+=("ruff format --check")
"$PY" -m mypy || failed+=("mypy")
mapfile -t cxx_sources < <(find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' | sort)
"$VENV/bin/clang-format" --dry-run -Werror "${cxx_sources[@]}" || failed+=("clang-format (run: .venv/bin/clang-format -i csrc/...)")
rc=0
"$PY" -m pytest -q tests bench --benchmark-disable "$@" || rc=$?
case $rc in
    0) ;;
    5) failed+=("pytest (no tests collected: exit 5)") ;;
    *) failed+=("pytest (exit $rc)") ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
    printf 'test.sh: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "test.sh: all passed"
