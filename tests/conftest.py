"""Fixtures shared by the whole suite.

`backend` runs a test on every backend registered in lookahead_fused.backends that can run
on this machine's CPU. A backend that CI must have (EXPECTED_ON_CPU) and that is registered
but cannot run is a failure (test_expected_backends_are_usable), never a silent skip.
"""

from __future__ import annotations

import os
import random
import sys
import zlib
from typing import Any

# The Triton kernels run on CPU tensors through Triton's interpreter: set it before anything
# imports triton (triton.jit reads it when a kernel is defined). A GPU run can override it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lookahead_fused import backends  # noqa: E402

# Backends that must run on a CPU-only machine once they are part of the build:
# "cpu" (the C++ kernels), "triton" under TRITON_INTERPRET=1, "cuda_emulated" (the CUDA
# kernel source compiled for the host).
EXPECTED_ON_CPU = ("eager", "foreach", "cpu", "triton", "cuda_emulated")

CPU = torch.device("cpu")


def usable_backends() -> list[str]:
    return [name for name in backends.NAMES if backends.unavailable(name, CPU) is None]


@pytest.fixture(params=usable_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def seed_everything(seed: int) -> None:
    """Seed every random generator a test may draw from without a generator of its own."""
    random.seed(seed)
    torch.manual_seed(seed)  # the CPU generator and every CUDA device's
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


@pytest.fixture(autouse=True)
def _seeded_rng(request: pytest.FixtureRequest) -> None:
    """Every test starts from generators seeded by its own id, so that its random inputs are
    the same whichever tests ran before it, alone or in the whole suite (`-k`, `-x`, xdist,
    a reordered file): a failure reproduces with the test's id alone."""
    seed_everything(zlib.crc32(request.node.nodeid.encode()))


def pytest_report_header(config: pytest.Config) -> str:
    lines = [f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]
    for name in backends.NAMES:
        why = backends.unavailable(name, CPU)
        lines.append(f"backend {name}: {'usable' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def pytest_configure(config: pytest.Config) -> None:
    # `pytest -m gpu` runs the tests that need a CUDA GPU (bench/gpu_report.sh does, on a GPU machine).
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with the reason 'needs a CUDA GPU' without one")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What the property-based fuzz's examples reached, per backend (tests/test_fuzz.py)."""
    fuzz = sys.modules.get("tests.test_fuzz")
    coverage = getattr(fuzz, "COVERAGE", None)
    if not coverage:
        return
    terminalreporter.section("fuzz coverage (tests/test_fuzz.py)")
    for backend, seen in coverage.items():
        terminalreporter.write_line(f"{backend}: " + ", ".join(f"{what} {n}" for what, n in seen.items()))
