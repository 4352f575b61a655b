"""The build backend: scikit-build-core, plus the one fallback its settings cannot express.

pyproject.toml's `if.failed` override already turns a failed CMake configure or build (no C++
compiler, no Python headers, ...) into a pure-Python wheel. It does not cover CMake or ninja
being absent altogether: scikit-build-core raises CMakeNotFoundError / NinjaNotFoundError
before anything runs, and an override cannot say "when there is no CMake" (its conditions
have no negation). That happens with `pip install --no-build-isolation` on a machine with
neither a cmake on PATH nor the cmake package (an isolated build gets cmake from PyPI). Then
this module builds the wheel again with wheel.cmake=false, as the override would have, unless
LOOKAHEAD_FUSED_REQUIRE_EXTENSION is set. Every hook is scikit-build-core's own otherwise.
"""

from __future__ import annotations

import os
import sys

from scikit_build_core import build as _skbuild
from scikit_build_core.errors import NotFoundError

# The PEP 517/660 hooks, scikit-build-core's own: those its __all__ names and this version
# defines (0.11 names prepare_metadata_for_build_editable in __all__ where it may be absent).
__all__ = [name for name in _skbuild.__all__ if hasattr(_skbuild, name)]
globals().update({name: getattr(_skbuild, name) for name in __all__})


def _extension_required() -> bool:
    """LOOKAHEAD_FUSED_REQUIRE_EXTENSION, read as scikit-build-core reads `if.env` booleans."""
    value = os.environ.get("LOOKAHEAD_FUSED_REQUIRE_EXTENSION", "").strip().lower()
    return value in ("true", "on", "yes", "y", "t") or (value.isdigit() and int(value) > 0)


def _without_cmake_if_missing(hook, wheel_directory, config_settings=None, metadata_directory=None):
    try:
        return hook(wheel_directory, config_settings, metadata_directory)
    except NotFoundError as e:
        if _extension_required():
            raise
        print(
            f"\n*** {e}: building lookahead_fused WITHOUT its compiled extension lookahead_fused._C "
            "(the eager, foreach and triton backends need none); install CMake and a C++17 compiler "
            "to build it, or set LOOKAHEAD_FUSED_REQUIRE_EXTENSION=1 to make this an error.",
            file=sys.stderr,
        )
        return hook(wheel_directory, {**(config_settings or {}), "wheel.cmake": "false"}, metadata_directory)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _without_cmake_if_missing(_skbuild.build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _without_cmake_if_missing(_skbuild.build_editable, wheel_directory, config_settings, metadata_directory)
