"""Whether the compiled extension `lookahead_fused._C` imports, and what works without it.

_C is optional: `pip install` builds it when it can (a C++17 compiler, CMake) and otherwise
installs the pure-Python package (pyproject.toml, the `if.failed` override). Without it the
backends below that need it are unavailable; eager, foreach and triton still work and
backend="auto" picks among them. `import lookahead_fused` warns once (ExtensionMissingWarning),
and `python -m lookahead_fused info` says the same.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# The backends built from csrc/ (lookahead_fused.backends): nothing else needs _C.
NEEDS_EXTENSION = ("cpu", "cuda", "cuda_emulated")
# The ones that remain without it ("triton" only where Triton is installed).
WITHOUT_EXTENSION = ("eager", "foreach", "triton")


class ExtensionMissingWarning(UserWarning):
    """lookahead_fused._C did not import: the compiled backends are unavailable."""


def _load() -> str | None:
    try:
        importlib.import_module("lookahead_fused._C")
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


# Why `lookahead_fused._C` did not import, or None when it did (checked once, at import).
ERROR: str | None = _load()


def _load_tensor_keys() -> tuple[Any, str | None]:
    """(lookahead_fused._tensor_keys, None), or (None, why not). The module is optional and
    bound to the torch it was built with (csrc/tensor_keys.cpp): without it the front-end
    reads its per-step layout keys in Python (lookahead_fused/_buckets.py), with the same
    checks, at a few times the host time per tensor."""
    import torch  # noqa: F401 (first: its libraries are the ones _tensor_keys links against)

    try:
        return importlib.import_module("lookahead_fused._tensor_keys"), None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


# The C++ layout keys, or None, and why not (checked once, at import).
TENSOR_KEYS, TENSOR_KEYS_ERROR = _load_tensor_keys()


def missing_message() -> str:
    """What `import lookahead_fused` warns and `info` prints when _C is missing."""
    return (
        f"lookahead_fused._C is not available ({ERROR}): the {', '.join(NEEDS_EXTENSION)} backends "
        f"cannot run; {', '.join(WITHOUT_EXTENSION[:-1])} and {WITHOUT_EXTENSION[-1]} (where Triton is "
        "installed) still work, and backend='auto' picks among them. `python -m lookahead_fused info` "
        "lists what runs here; reinstall with a C++17 compiler and CMake to build _C."
    )


def warn_if_missing(stacklevel: int = 2) -> None:
    if ERROR is not None:
        warnings.warn(missing_message(), ExtensionMissingWarning, stacklevel=stacklevel + 1)
