"""Backend "eager": the reference itself, one tensor at a time.

It reads counters and found_inf on the host (`.item()`), so it synchronises with the device
every step and cannot be captured in a CUDA graph: it is the spec, not a fast path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import reference
from .._buckets import Bucket
from ._capture import capturing


def unavailable(device: torch.device) -> str | None:
    return None


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    if capturing():
        raise RuntimeError(
            "step() is being captured in a CUDA graph, but the eager backend reads its counters on the "
            "host every step and cannot be captured: use backend 'cuda', 'triton' or 'foreach'"
        )
    params = [p for b in buckets for p in b.params]
    states = [v for b in buckets for v in b.views]
    flat_grads = [g for gs in grads for g in gs]
    reference.step_group(kind, params, flat_grads, states, group, grad_scale=grad_scale, found_inf=found_inf)
    for b in buckets:
        b.host_count = None  # counters were advanced through the views
