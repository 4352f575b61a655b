"""Every test's random inputs are fixed by its own id (conftest._seeded_rng): a test draws
the same numbers alone as after any other tests, so a failure reproduces by its id."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_DRAWS = """
import random
import torch

def _draw(name):
    print(f"DRAW {name} {torch.rand(3).tolist()} {torch.randint(0, 10**9, (1,)).item()} {random.random()}")

def test_a():
    _draw("a")

def test_b():
    _draw("b")
"""


def _draws(pytester: pytest.Pytester, *args: str) -> dict[str, str]:
    result = pytester.runpytest_subprocess("-s", "-q", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=len([a for a in args if a.startswith("test_draws.py::")]) or 2)
    draws = [line[line.index("DRAW ") :].split(" ", 2) for line in result.outlines if "DRAW " in line]
    return {name: values for _, name, values in draws}


def test_a_test_draws_the_same_alone_and_after_others(pytester: pytest.Pytester) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), pytester.path / "conftest.py")
    pytester.makepyfile(test_draws=_DRAWS)
    both = _draws(pytester)
    alone = _draws(pytester, "test_draws.py::test_b")
    assert alone["b"] == both["b"]
    assert both["a"] != both["b"]  # seeded by id: two tests do not share their inputs
