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
    elf = set(re.findall(r"\.(sm_\d+[af]?)\.cubin", _cuobjdump("--list-elf")))
    ptx = {"compute_" + a for a in re.findall(r"\.sm_(\d+[af]?)\.ptx", _cuobjdump("--list-ptx"))}
    assert elf, "no machine code in _C"
    assert set(info["cuda_architectures"]) == elf | ptx


# ---------------------------------------------------------------------------------------
# Code generation of every step-kernel variant, read from the SASS nvcc built (sm_80, sm_90).
# ---------------------------------------------------------------------------------------

# __launch_bounds__(256): ptxas may give a thread at most 255 registers (the ISA's limit, and
# 65536 registers per SM / 256 threads = 256 leaves room for one block). BUDGET is what the
# kernels are held to beyond that: at most 128 registers keep two blocks of 256 threads per
# SM resident, which a memory-bound kernel needs to keep loads in flight (today: at most 64).
REG_LIMIT = 255
REG_BUDGET = 128

_ACCESS = re.compile(r"\b(LDG|STG|LDL|STL|LD|ST)\.E((?:\.\w+)*)")
_DTYPE_BYTES = {"float": 4, "lookahead_fused::bf16": 2, "lookahead_fused::fp16": 2}
_VARIANT = re.compile(
    r"step_kernel<[^<]*Variant<(true|false), (true|false), (true|false), \(lookahead_fused::gpu::Phase\)(\d), "
    r"([\w:]+), ([\w:]+), ([\w:]+)>"
)


def _demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.split("\n")[: len(names)]


def _short(name: str) -> str:
    return name.replace("lookahead_fused::cuda::(anonymous namespace)::", "").replace("lookahead_fused::", "")


def sass_accesses(sass: str) -> dict[str, dict[tuple[str, int], int]]:
    """Per kernel (demangled name): {(mnemonic, bits): count} of its memory instructions."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    result = {}
    for name, body in zip(_demangle(parts[1::2]), parts[2::2]):
        counts: dict[tuple[str, int], int] = {}
        for op, mods in _ACCESS.findall(body):
            bits = 32
            for m in mods.split("."):
                bits = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}.get(m, bits)
            counts[(op, bits)] = counts.get((op, bits), 0) + 1
        result[name] = counts
    return result


def vector_findings(accesses: dict[str, dict[tuple[str, int], int]]) -> list[str]:
    """What is wrong with the step kernels' memory instructions: every buffer a variant reads
    (writes) on its vector path needs a load (store) of 4 elements (128 bits for fp32, 64 for
    bf16/fp16); no access may be local (LDL/STL: spills or a stack array). θ and g come through
    pointers read from the segment table, which nvcc cannot prove global: their accesses are
    generic (LD/ST, same width) and count as global ones here. (A 64-bit load check alone is
    weak for bf16/fp16: the int64 table loads are 64-bit too; the stores are not.)"""
    findings = []
    variants = 0
    for name, counts in accesses.items():
        if "step_kernel" not in name:
            continue
        m = _VARIANT.search(name)
        assert m, f"cannot read the variant of {name}"
        variants += 1
        _, has_m, _, phase, p, s, f = m.groups()
        loads = {_DTYPE_BYTES[p], _DTYPE_BYTES[f]}
        stores = {_DTYPE_BYTES[p]} | ({_DTYPE_BYTES[f]} if phase != "1" else set())  # 1: kInnerDots, reads φ
        if has_m == "true":
            loads.add(_DTYPE_BYTES[s])
            stores.add(_DTYPE_BYTES[s])
        for ops, need in ((("LDG", "LD"), loads), (("STG", "ST"), stores)):
            for size in sorted(need):
                if sum(counts.get((op, 32 * size), 0) for op in ops) == 0:
                    findings.append(f"{_short(name)}: no {ops[0]} of {32 * size} bits (4 x {8 * size}-bit elements)")
        local = {f"{op}.{bits}": n for (op, bits), n in counts.items() if op in ("LDL", "STL")}
        if local:
            findings.append(f"{_short(name)}: local memory accesses {local}")
    if variants == 0:
        findings.append("no step_kernel in the SASS")
    return findings


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_step_kernels_use_vector_accesses(info, arch) -> None:
    if arch not in info["cuda_architectures"]:
        pytest.skip(f"_C has no {arch} code")
    accesses = sass_accesses(_cuobjdump("-sass", "-arch", arch))
    # 3 parameter dtypes with their state/slow dtypes (1 + 4 + 4) x 10 optimizer/phase variants.
    assert sum("step_kernel" in n for n in accesses) == 90
    findings = vector_findings(accesses)
    assert not findings, "\n".join(findings[:20])


def register_usage(text: str) -> dict[str, dict[str, int]]:
    """--dump-resource-usage per architecture: {arch: {demangled kernel: registers}}."""
    result: dict[str, dict[str, int]] = {}
    for block in re.split(r"\n(?=Fatbin elf code)", text):
        arch = re.search(r"arch = (sm_\d+)", block)
        found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", block)
        if arch and found:
            names = _demangle([n for n, _ in found])
            result[arch.group(1)] = {n: int(r) for n, (_, r) in zip(names, found)}
    return result


def test_registers_within_launch_bounds(info) -> None:
    usage = register_usage(_cuobjdump("--dump-resource-usage"))
    assert set(usage) == {a for a in info["cuda_architectures"] if a.startswith("sm_")}
    over = [
        f"{arch} {_short(name)}: {regs} registers"
        for arch, kernels in usage.items()
        for name, regs in kernels.items()
        if regs > min(REG_LIMIT, REG_BUDGET)
    ]
    assert not over, f"over the budget of {REG_BUDGET} (limit {REG_LIMIT}):\n" + "\n".join(over[:20])


def _build_dir() -> Path:
    """The build folder of this environment's editable install (pyproject.toml: build/<wheel
    tag>, kept between installs): the newest under build/ configured with a Python of the
    folder sys.executable is in (python or python3 of the same venv)."""
    mine = []
    for cache in (ROOT / "build").glob("*/CMakeCache.txt"):
        found = re.search(r"^Python_EXECUTABLE:\w+=(.+)$", cache.read_text(errors="replace"), re.MULTILINE)
        if found and Path(found.group(1)).parent == Path(sys.executable).parent:
            mine.append(cache)
    if not mine:
        return ROOT / "build" / "<none configured for this python>"
    return max(mine, key=lambda c: c.stat().st_mtime).parent


def test_ptxas_log_kept_and_clean(info) -> None:
    log = _build_dir() / "ptxas.log"
    if not log.exists():
        pytest.skip(f"no build folder at {_build_dir()} (_C was not built from this checkout)")
    text = log.read_text()
    entries = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+[af]?)'", text)
    assert {arch for _, arch in entries} == {a for a in info["cuda_architectures"] if a.startswith("sm_")}
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert len(frames) >= len(entries)  # one per kernel, plus one per non-inlined device function
    assert all(f == ("0", "0", "0") for f in frames), "a kernel spills (see ptxas.log)"


# ---------------------------------------------------------------------------------------
# CMake's choices, by configuring the project in a scratch folder (no compilation).
# ---------------------------------------------------------------------------------------


def _configure(tmp_path: Path, path: str, *args: str, env: dict | None = None, stderr: bool = False) -> str:
    import pybind11

    environment = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "TORCH_CUDA_ARCH_LIST")}
    environment.update(env or {}, PATH=path)
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *args],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr if stderr else result.stdout


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
    """SASS from the oldest architecture nvcc builds to sm_100 (where this nvcc builds it), PTX
    of the newest."""
    oldest = "sm_75" if _nvcc_major() >= 13 else "sm_70"  # CUDA 13 dropped Volta
    archs, names, _ = _cuda_arches("")
    newest = names[-2]
    assert names[0] == oldest and names[-1] == "compute_" + newest[3:] and "sm_90" in names
    if _nvcc_major() >= 13:
        assert names == [oldest, "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "compute_100"]
    out = _configure(tmp_path, _path_with_nvcc())
    assert f"CUDA kernels for {';'.join(names)}\n" in out


def test_cmake_architectures_from_torch_cuda_arch_list(tmp_path) -> None:
    """TORCH_CUDA_ARCH_LIST as torch's extensions read it, through the whole configure step
    (CMAKE_CUDA_ARCHITECTURES, when given, wins over both: plain CMake)."""
    out = _configure(tmp_path, _path_with_nvcc(), env={"TORCH_CUDA_ARCH_LIST": "8.0 9.0a Hopper"})
    assert "CUDA kernels for sm_80;sm_90a;sm_90;compute_90\n" in out


def test_cmake_without_a_buildable_architecture_builds_the_cpu_part(tmp_path) -> None:
    """AUTO: an arch list this nvcc cannot build warns and builds the CPU part (pip install .
    still works); ON stops."""
    out = _configure(tmp_path, _path_with_nvcc(), "-DLOOKAHEAD_FUSED_CUDA=AUTO", env={"TORCH_CUDA_ARCH_LIST": "2.0"},
                     stderr=True)  # fmt: skip
    assert "CPU kernels only" in out and "'2.0'" in out


def _cuda_arches(spec: str, gpu_code: str | None = None, gpu_arch: str | None = None) -> tuple[list, list, str]:
    """cmake/cuda_arches.cmake alone (cmake -P, no project): (CMAKE_CUDA_ARCHITECTURES entries,
    names build_info() reports, warnings). gpu_code/gpu_arch stand for another nvcc's answers."""
    args = ["cmake", f"-DLAF_NVCC={NVCC}", f"-DLAF_ARCH_SPEC={spec}"]
    if gpu_code is not None:
        args += [f"-DLAF_NVCC_GPU_CODE={gpu_code}", f"-DLAF_NVCC_GPU_ARCH={gpu_arch}"]
    result = subprocess.run([*args, "-P", str(ROOT / "cmake" / "cuda_arches.cmake")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    archs = re.search(r"CUDA_ARCHITECTURES=(.*)", result.stdout).group(1)
    names = re.search(r"ARCH_NAMES=(.*)", result.stdout).group(1)
    return [a for a in archs.split(";") if a], [n for n in names.split(";") if n], result.stderr


NVCC13 = "sm_75 sm_80 sm_86 sm_87 sm_88 sm_89 sm_90 sm_100 sm_110 sm_103 sm_120 sm_121"
NVCC13_PTX = NVCC13.replace("sm_", "compute_")


@pytest.mark.parametrize(
    ("spec", "archs", "names"),
    [
        ("9.0a", ["90a-real"], ["sm_90a"]),
        ("10.0a;12.0a", ["100a-real", "120a-real"], ["sm_100a", "sm_120a"]),
        ("9.0a+PTX", ["90a"], ["sm_90a", "compute_90a"]),
        ("8.6+PTX", ["86"], ["sm_86", "compute_86"]),
        ("9.0 10.0", ["90-real", "100-real"], ["sm_90", "sm_100"]),
        ("  8.0;;9.0  ", ["80-real", "90-real"], ["sm_80", "sm_90"]),
        ("9.0 9.0+PTX", ["90"], ["sm_90", "compute_90"]),
        ("Hopper", ["90"], ["sm_90", "compute_90"]),
        ("Ampere Turing", ["80-real", "86", "75"], ["sm_80", "sm_86", "compute_86", "sm_75", "compute_75"]),
        ("Ada;Blackwell", ["89", "100-real", "103-real", "120-real", "121"],
         ["sm_89", "compute_89", "sm_100", "sm_103", "sm_120", "sm_121", "compute_121"]),
    ],
)  # fmt: skip
def test_torch_cuda_arch_list_syntax(spec, archs, names) -> None:
    """What torch.utils.cpp_extension accepts, as CMake entries (an "a" keeps its arch-specific
    features: 90a-real), against nvcc 13's list of targets."""
    got_archs, got_names, warnings = _cuda_arches(spec, NVCC13, NVCC13_PTX)
    assert (got_archs, got_names) == (archs, names)
    assert "Warning" not in warnings


def test_architectures_nvcc_cannot_build_are_dropped_with_a_warning() -> None:
    archs, names, warnings = _cuda_arches("3.5 7.0 8.0a 8.0 sm_90 12.1+PTX", NVCC13, "compute_75 compute_80")
    assert archs == ["80-real", "121-real"] and names == ["sm_80", "sm_121"]
    for entry in ("sm_35", "sm_70", "sm_80a", "'sm_90'", "compute_121"):
        assert entry in warnings
    assert _cuda_arches("7.0", NVCC13, NVCC13_PTX)[:2] == ([], [])  # empty: the caller decides


def test_default_architectures_follow_nvcc() -> None:
    old = "sm_70 sm_75 sm_80 sm_86 sm_87 sm_89 sm_90"  # nvcc 12.0: no sm_100, sm_120
    assert _cuda_arches("", old, old.replace("sm_", "compute_"))[1] == [
        "sm_70", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]  # fmt: skip
    assert _cuda_arches("", NVCC13, NVCC13_PTX)[1] == [
        "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "compute_100"]  # fmt: skip
    assert _cuda_arches(" ", NVCC13, NVCC13_PTX)[0] == [
        "75-real", "80-real", "86-real", "89-real", "90-real", "100"]  # fmt: skip
    # The real nvcc: everything it reports building is in its own list.
    real = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    assert {n for n in _cuda_arches("")[1] if n.startswith("sm_")} <= set(real)


def test_module_imports_and_reports_without_a_gpu(info) -> None:
    """_C imports on a machine without a GPU (it just did), and asking the CUDA runtime about
    a device returns its reason as text instead of failing."""
    why = _C.cuda_kernel_unavailable(0)
    assert isinstance(why, str)
    import torch

    if not torch.cuda.is_available():
        assert why, "the CUDA runtime found no device, yet reported none missing"
    assert lookahead_fused.__name__ == "lookahead_fused"
