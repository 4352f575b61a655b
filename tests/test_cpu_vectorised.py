"""The CPU kernels' main loops are vectorised, at every ISA level a portable build holds.

The fused step is memory-bound only while its loop is SIMD: a scalar Adam loop (one
`vsqrtss` per element) makes a sync step several times a plain one. GCC decides that loop by
loop and instantiation by instantiation, and it has left some scalar on AVX2 while vectorising
them on AVX-512 (a loop-invariant select in the body made loop unswitching hit its size
limit; a float `?:` sunk into a branch defeated if-conversion). So this test compiles
csrc/cpu_kernels.cpp as CMakeLists.txt does, once per ISA level, and reads the compiler's
own account:
  - the vectoriser's dump (-fdump-tree-vect-details) per function: in every instantiation of
    `walk_piece`, each loop of the main loop's lines is "LOOP VECTORIZED", none is left;
  - the disassembly: every Adam instantiation with an inner update has a full-width vector
    square root (`vsqrtps` on ymm for x86-64-v3, zmm for x86-64-v4, `sqrtps` on xmm for the
    x86-64 baseline).
Instantiations that identical-code folding merged share an address: each address must hold
at least one instantiation the dump shows vectorised.
And the builds above the baseline define no weak (COMDAT) code: the linker keeps one copy of
each weak function for the whole _C, which could be the AVX-512 one called from baseline code.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cpu_kernels.cpp"
# As CMakeLists.txt compiles the kernels (CMAKE_CXX_STANDARD 17 with extensions: gnu++17),
# less -march=, which each level sets.
FLAGS = ["-std=gnu++17", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-fPIC"]
# ISA level -> (vector sqrt mnemonic, register class of its full width)
LEVELS = {"x86-64": ("sqrtps", "xmm"), "x86-64-v3": ("vsqrtps", "ymm"), "x86-64-v4": ("vsqrtps", "zmm")}

CXX = shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA levels"),
    pytest.mark.skipif(CXX is None or shutil.which("objdump") is None, reason="needs g++ and objdump"),
]


def _main_loop_lines() -> range:
    """The source lines of walk_piece's main loop: from its `#pragma omp simd reduction` to
    the line after the loop (the lane reduction GCC adds is reported at the pragma)."""
    lines = SOURCE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("#pragma omp simd reduction")) + 1
    end = next(i for i, line in enumerate(lines[start:], start) if "dots.g_dot_d += gd;" in line) + 1
    return range(start, end)


def _compile(level: str, tmp: Path) -> tuple[str, str, str]:
    obj, dump = tmp / f"{level}.o", tmp / f"{level}.vect"
    # As CMake: each level in its own namespace; the lowest one also holds the dispatcher.
    ns = ["-DLAF_CPU_NS=" + level.replace("-", "_")] if level != "x86-64" else []
    cmd = [CXX, *FLAGS, f"-march={level}", *ns, "-c", str(SOURCE), "-o", str(obj), f"-fdump-tree-vect-details={dump}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp)
    nm = subprocess.run(["nm", "-C", str(obj)], check=True, capture_output=True, text=True).stdout
    disasm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    return dump.read_text(errors="replace"), nm, disasm


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    tmp = tmp_path_factory.mktemp("cpu_vectorised")
    with ThreadPoolExecutor(len(LEVELS)) as pool:
        futures = {level: pool.submit(_compile, level, tmp) for level in LEVELS}
        return {level: f.result() for level, f in futures.items()}


def _template_args(name: str) -> str:
    return re.search(r"walk_piece<([^>]*)>", name).group(1)


def _is_adam_inner(args: str) -> bool:
    flags = [a.strip() for a in args.split(",")]
    return flags[0] == "true" and flags[3] == "true"  # kAdamKind, kInner


def vectorisation(dump: str, lines: range) -> dict[str, list[tuple[int, bool]]]:
    """walk_piece instantiation -> [(line, vectorised)] for each loop of the main loop's lines."""
    result: dict[str, list[tuple[int, bool]]] = {}
    for function in re.split(r"\n;; Function ", dump)[1:]:
        header = function.split("\n", 1)[0]
        if "walk_piece<" not in header:
            continue
        loops = []
        for block in re.split(r"\nAnalyzing loop at ", function)[1:]:
            m = re.match(r"\S*cpu_kernels\.cpp:(\d+)", block)
            if m and int(m.group(1)) in lines:
                loops.append((int(m.group(1)), "LOOP VECTORIZED" in block))
        result[_template_args(header)] = loops
    return result


def symbols_by_address(nm: str) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for line in nm.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTW" and "walk_piece<" in parts[2]:
            groups.setdefault(parts[0].lstrip("0"), set()).add(_template_args(parts[2]))
    return groups


def sqrt_counts(disasm: str, mnemonic: str, width: str) -> dict[str, tuple[int, int]]:
    """address -> (full-width vector sqrts, scalar sqrts) per walk_piece function."""
    counts = {}
    for chunk in re.split(r"\n(?=[0-9a-f]+ <)", disasm):
        m = re.match(r"([0-9a-f]+) <(.*)>:", chunk)
        if m and "walk_piece<" in m.group(2):
            vector = len(re.findall(rf"\t{mnemonic}\s+[^\n]*%{width}", chunk))
            scalar = len(re.findall(r"\tv?sqrtss\s", chunk))
            counts[m.group(1).lstrip("0")] = (vector, scalar)
    return counts


@pytest.mark.parametrize("level", list(LEVELS))
def test_every_main_loop_vectorised(builds, level: str) -> None:
    dump, nm, _ = builds[level]
    loops = vectorisation(dump, _main_loop_lines())
    assert len(loops) >= 50, f"only {len(loops)} walk_piece instantiations in the dump: did the kernel change?"
    scalar = {f: ls for f, ls in loops.items() if not ls or not all(v for _, v in ls)}
    assert not scalar, f"{level}: {len(scalar)} of {len(loops)} walk_piece main loops not vectorised, e.g. " + \
        "; ".join(f"walk_piece<{f}>: {ls}" for f, ls in list(scalar.items())[:5])  # fmt: skip
    # Folded instantiations: every address holds one the dump shows vectorised.
    groups = symbols_by_address(nm)
    assert sum(len(g) for g in groups.values()) >= len(loops)
    orphans = [names for names in groups.values() if not names & loops.keys()]
    assert not orphans, f"{level}: walk_piece code not in the vectoriser's dump: {orphans[:3]}"


@pytest.mark.parametrize("level", list(LEVELS))
def test_adam_has_vector_sqrt(builds, level: str) -> None:
    _, nm, disasm = builds[level]
    mnemonic, width = LEVELS[level]
    counts = sqrt_counts(disasm, mnemonic, width)
    adam = {addr: names for addr, names in symbols_by_address(nm).items() if any(map(_is_adam_inner, names))}
    assert len(adam) >= 20, f"only {len(adam)} Adam instantiations found"
    missing = {addr: sorted(names)[0] for addr, names in adam.items() if counts.get(addr, (0, 0))[0] == 0}
    assert not missing, (
        f"{level}: {len(missing)} of {len(adam)} Adam instantiations without a {width} {mnemonic} "
        f"(scalar main loop), e.g. walk_piece<{next(iter(missing.values()))}>"
    )
    # A vectorised loop keeps scalar square roots only for its last few elements.
    vector, scalar = (sum(c[i] for a, c in counts.items() if a in adam) for i in (0, 1))
    assert vector >= len(adam) and scalar <= 8 * len(adam), (vector, scalar)


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "x86-64"])
def test_no_weak_code_above_the_baseline(builds, level: str) -> None:
    _, nm, _ = builds[level]
    weak = [line for line in nm.splitlines() if line.split(" ", 2)[1:2] in (["W"], ["V"], ["u"], ["i"])]
    weak = [line for line in weak if "DW.ref.__gxx_personality_v0" not in line]  # data, not code
    assert not weak, f"{level}: weak symbols the linker may share with other levels: {weak[:5]}"


def test_kernel_flags_match_the_build() -> None:
    """The flags above are the ones CMakeLists.txt gives the kernels."""
    from lookahead_fused import _C

    flags = _C.build_info()["cpu_kernel_flags"].split()
    assert {"-O3", "-fno-math-errno", "-ffp-contract=off"} <= set(flags)
