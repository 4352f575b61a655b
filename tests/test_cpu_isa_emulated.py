"""The portable build on CPUs that lack this machine's ISA levels, executed.

A wheel must run on any x86-64 CPU torch runs on: `_C` holds the CPU kernels once per ISA
level (x86-64, x86-64-v3 = AVX2 + FMA, x86-64-v4 = AVX-512) and picks the highest one the CPU
runs. tests/test_cpu_vectorised.py reads the objects (no AVX code outside its level's
namespace); this test runs the installed package, as a user imports it, on CPUs without
AVX-512 and without AVX, under QEMU's user-mode emulation (`qemu-x86_64 -cpu <model>`: its
TCG implements SSE to AVX2 and FMA, no AVX-512, and raises SIGILL for an instruction the
model lacks):

- Haswell (AVX2, FMA, BMI2, no AVX-512): the kernels run x86-64-v3, as on an AVX2-only CPU;
- Nehalem (SSE4.2, no AVX; torch's own CPU build needs at least this much): the baseline.

In each, tests/isa_worker.py steps the "cpu" backend through every variant in fp32, bf16 and
fp16 against the eager reference, and asks `cpu_set_isa` for each level built: the ones the
model lacks must be refused. The two guests run side by side (about 55 s on 2 cores); this
is the one place in the suite where the levels an AVX-512 machine never selects by itself
run unforced, and where the refusal path of `cpu_set_isa` runs at all.

QEMU comes from Debian's qemu-user (test.sh installs it where it can); .ci/run sets
LOOKAHEAD_FUSED_REQUIRE_QEMU=1 so that in CI a missing QEMU is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lookahead_fused import _C, _extension, testing  # type: ignore[attr-defined]

from .isa_worker import DTYPES, STEPS

WORKER = Path(__file__).with_name("isa_worker.py")
QEMU = shutil.which("qemu-x86_64")
REQUIRED = os.environ.get("LOOKAHEAD_FUSED_REQUIRE_QEMU") == "1"

# QEMU CPU model -> the levels it runs, lowest first (the last one is selected).
GUESTS = {"Haswell": ["x86-64", "x86-64-v3"], "Nehalem": ["x86-64"]}

if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("x86-64 ISA levels", allow_module_level=True)
if _C.build_info()["cpu_arch"] != "dispatch":
    pytest.skip(
        f"_C is a single-ISA build (LOOKAHEAD_FUSED_CPU_ARCH={_C.build_info()['cpu_arch']}): not portable by request",
        allow_module_level=True,
    )
if QEMU is None:
    message = "qemu-x86_64 not found (Debian: apt-get install qemu-user; test.sh installs it where it can)"
    if REQUIRED:
        pytest.fail(message + "; LOOKAHEAD_FUSED_REQUIRE_QEMU=1", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def _qemu_version() -> tuple[int, int]:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    assert match, f"qemu-x86_64 --version printed {out!r}"
    return int(match[1]), int(match[2])


def _run_guest(model: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LOOKAHEAD_FUSED_CPU_ISA"}
    return subprocess.run(
        [QEMU, "-cpu", model, sys.executable, str(WORKER)],
        capture_output=True, text=True, timeout=900, env=env, cwd=cwd,
    )  # fmt: skip


def _stderr(proc: subprocess.CompletedProcess[str]) -> str:
    """The guest's stderr less QEMU's warnings about host features its TCG does not model."""
    lines = [line for line in proc.stderr.splitlines() if "TCG doesn't support requested feature" not in line]
    return "\n".join(lines[-40:])


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    # AVX2 and FMA in TCG came with QEMU 7.2: an older one would model a Haswell without them.
    assert _qemu_version() >= (7, 2), f"QEMU {_qemu_version()} emulates no AVX2; 7.2 or newer is needed"
    cwd = tmp_path_factory.mktemp("isa_guests")  # where a guest's core file would go
    with ThreadPoolExecutor(len(GUESTS)) as pool:
        futures = {model: pool.submit(_run_guest, model, cwd) for model in GUESTS}
        return {model: f.result() for model, f in futures.items()}


def _result(proc: subprocess.CompletedProcess[str], model: str) -> dict[str, Any]:
    assert proc.returncode == 0, (
        f"the package under qemu-x86_64 -cpu {model} exited with {proc.returncode}"
        + (" (SIGILL: an instruction this CPU lacks)" if proc.returncode in (-4, 132) else "")
        + f":\n{_stderr(proc)}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", GUESTS)
def test_levels_selected_and_refused(guests, model: str) -> None:
    got = _result(guests[model], model)
    levels = GUESTS[model]
    assert got["built"] == _C.build_info()["cpu_isas"], "the guest imported another _C"
    assert got["supported"] == levels, f"{model}: the levels it runs"
    assert got["isa"] == levels[-1], f"{model}: the highest level it runs is selected"
    lacking = [level for level in got["built"] if level not in levels]
    assert sorted(got["refused"]) == sorted(lacking), f"{model}: cpu_set_isa must refuse exactly {lacking}"
    for level, message in got["refused"].items():
        assert "this CPU lacks it" in message, (level, message)


@pytest.mark.parametrize("model", GUESTS)
def test_every_variant_matches_the_reference(guests, model: str) -> None:
    got = _result(guests[model], model)
    assert len(got["kernel_calls"]) == len(testing.variants()) * len(DTYPES)
    assert min(got["kernel_calls"]) >= STEPS, "a run that did not reach the compiled kernels every step"
    assert got["failures"] == [], f"{model} ({got['isa']}): " + "\n".join(got["failures"][:20])
    assert got["tensor_keys"] == (_extension.TENSOR_KEYS is not None), "the guest's layout checks differ from ours"
