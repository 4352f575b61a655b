"""Triton kernels of lookahead_fused, installed as `lookahead_fused.triton_kernels`.

`lookahead.py` holds the fused step (one launch per bucket per step) and the counter
update; `lookahead_fused.backends.triton` builds their tables and launches them.
"""

from .lookahead import (
    INNER_STATE_CODES,
    PHASE_INNER_DOTS,
    PHASE_STEP,
    PHASE_SYNC_ONLY,
    SYNC_DEVICE,
    SYNC_NEVER,
    SYNC_NOW,
    TABLE_COLUMNS,
    advance_counters_kernel,
    lookahead_step_kernel,
)

__all__ = [
    "INNER_STATE_CODES",
    "PHASE_INNER_DOTS",
    "PHASE_STEP",
    "PHASE_SYNC_ONLY",
    "SYNC_DEVICE",
    "SYNC_NEVER",
    "SYNC_NOW",
    "TABLE_COLUMNS",
    "advance_counters_kernel",
    "lookahead_step_kernel",
]
