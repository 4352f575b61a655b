"""The benchmark's tests seed their random generators as the suite's do (tests/conftest.py)."""

from __future__ import annotations

import zlib

import pytest

from tests.conftest import seed_everything


@pytest.fixture(autouse=True)
def _seeded_rng(request: pytest.FixtureRequest) -> None:
    seed_everything(zlib.crc32(request.node.nodeid.encode()))
