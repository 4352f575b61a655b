import pytest

from lookahead_fused import backends

from .conftest import CPU, EXPECTED_ON_CPU


@pytest.mark.parametrize("name", [n for n in EXPECTED_ON_CPU if n in backends.NAMES])
def test_expected_backends_are_usable(name: str) -> None:
    assert backends.unavailable(name, CPU) is None, f"backend {name!r} is registered but cannot run here"


def test_eager_and_foreach_are_registered() -> None:
    assert {"eager", "foreach"} <= set(backends.NAMES)
