"""The CUDA build, checked without a GPU: nvcc compiled the kernels for real architectures,
no kernel spills registers (read from the compiled module with cuobjdump and from the
`-Xptxas -v` log of the build), `_C.build_info()` tells the truth about the architectures,
and CMake picks the architectures as documented, or builds the CPU part alone without nvcc.

Skipped only where the CUDA tools are absent (nvcc, or cuobjdump, which Triton also ships)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lookahead_fused
from lookahead_fused import _C

ROOT = Path(__file__).resolve().parent.parent
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def _find_tool(name: str) -> str | None:
    candidates = [shutil.which(name), CUDA_HOME / "bin" / name]
    try:
        import triton  # ships cuobjdump and ptxas for its own use

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c is not None and os.access(c, os.X_OK):
            return str(c)
    return None


NVCC = _find_tool("nvcc")
CUOBJDUMP = _find_tool("cuobjdump")
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="nvcc or cuobjdump not found")


def _module() -> str:
    return _C.__file__


def _cuobjdump(*args: str) -> str:
    return subprocess.run([CUOBJDUMP, *args, _module()], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def info() -> dict:
    info = _C.build_info()
    assert info["cuda"], f"nvcc is at {NVCC} but _C was built without CUDA: rebuild with nvcc on PATH"
    return info


def test_no_kernel_spills_or_uses_local_memory(info) -> None:
    usage = _cuobjdump("--dump-resource-usage")
    functions = re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage)
    names = " ".join(name for name, _ in functions)
    for kernel in ("step_kernel", "counter_kernel", "finalize_kernel"):
        assert kernel in names
    for name, resources in functions:
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", resources))
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", f"{name} spills: {resources}"


def test_build_info_lists_the_compiled_architectures(info) -> None:
    elf = set(re.findall(r"\.(sm_\d+)\.cubin", _cuobjdump("--list-elf")))
    ptx = {"compute_" + a for a in re.findall(r"\.sm_(\d+)\.ptx", _cuobjdump("--list-ptx"))}
    assert elf, "no machine code in _C"
    assert set(info["cuda_architectures"]) == elf | ptx


def _build_dir() -> Path:
    return ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"


def test_ptxas_log_kept_and_clean(info) -> None:
    log = _build_dir() / "ptxas.log"
    if not log.exists():
        pytest.skip(f"no build folder at {_build_dir()} (_C was not built from this checkout)")
    text = log.read_text()
    entries = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'", text)
    assert {arch for _, arch in entries} == {a for a in info["cuda_architectures"] if a.startswith("sm_")}
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert len(frames) >= len(entries)  # one per kernel, plus one per non-inlined device function
    assert all(f == ("0", "0", "0") for f in frames), "a kernel spills (see ptxas.log)"


# ---------------------------------------------------------------------------------------
# CMake's choices, by configuring the project in a scratch folder (no compilation).
# ---------------------------------------------------------------------------------------


def _configure(tmp_path: Path, path: str, *args: str, env: dict | None = None) -> str:
    import pybind11

    environment = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "TORCH_CUDA_ARCH_LIST")}
    environment.update(env or {}, PATH=path)
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *args],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _path_with_nvcc() -> str:
    return f"{Path(NVCC).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _nvcc_major() -> int:
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"release (\d+)", out).group(1))


def test_cmake_without_nvcc_builds_the_cpu_part_alone(tmp_path) -> None:
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvcc").exists()
    )
    assert "CPU kernels only" in _configure(tmp_path, path)


def test_cmake_default_architectures(tmp_path) -> None:
    oldest = "sm_75" if _nvcc_major() >= 13 else "sm_70"  # CUDA 13 dropped Volta
    out = _configure(tmp_path, _path_with_nvcc())
    assert f"CUDA kernels for {oldest};sm_80;sm_86;sm_89;sm_90;compute_90" in out


def test_cmake_architectures_from_torch_cuda_arch_list(tmp_path) -> None:
    """TORCH_CUDA_ARCH_LIST as torch's extensions read it (CMAKE_CUDA_ARCHITECTURES, when
    given, wins over both: plain CMake)."""
    out = _configure(tmp_path, _path_with_nvcc(), env={"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"})
    assert "CUDA kernels for sm_80;sm_90;compute_90\n" in out


def test_module_imports_and_reports_without_a_gpu(info) -> None:
    """_C imports on a machine without a GPU (it just did), and asking the CUDA runtime about
    a device returns its reason as text instead of failing."""
    why = _C.cuda_kernel_unavailable(0)
    assert isinstance(why, str)
    import torch

    if not torch.cuda.is_available():
        assert why, "the CUDA runtime found no device, yet reported none missing"
    assert lookahead_fused.__name__ == "lookahead_fused"
