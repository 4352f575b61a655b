"""lookahead_fused: Lookahead (Zhang et al. 2019) fused with its inner optimizer."""

from .optimizers import LookaheadAdam, LookaheadAdamW, LookaheadSGD
from .wrapper import Lookahead

__all__ = ["Lookahead", "LookaheadSGD", "LookaheadAdam", "LookaheadAdamW"]
__version__ = "0.1.0"
