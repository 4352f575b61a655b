"""lookahead_fused: Lookahead (Zhang et al. 2019) fused with its inner optimizer."""

import sys

# The one place the version is written: pyproject.toml reads it from here (scikit-build-core's
# regex provider), so the wheel's metadata and lookahead_fused.__version__ cannot disagree.
__version__ = "0.1.0"

from . import _extension  # noqa: E402
from ._extension import ExtensionMissingWarning  # noqa: E402
from .optimizers import LookaheadAdam, LookaheadAdamW, LookaheadSGD  # noqa: E402
from .wrapper import Lookahead  # noqa: E402

__all__ = ["Lookahead", "LookaheadSGD", "LookaheadAdam", "LookaheadAdamW", "ExtensionMissingWarning"]

# Without the compiled extension, say so once; `python -m lookahead_fused ...` says it in its
# own output instead (lookahead_fused/__main__.py).
_argv = getattr(sys, "orig_argv", [])
if not any(a == "-m" and b == "lookahead_fused" for a, b in zip(_argv, _argv[1:])):
    _extension.warn_if_missing()
del _argv
