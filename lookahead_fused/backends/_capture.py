"""CUDA-graph capture as the backends see it: whether a capture is under way, and the error a
backend raises when a step under capture would need new address tables.

A captured graph keeps the raw addresses its launches were given. A backend whose tables must
change (a parameter or a gradient that moved since the warm-up steps) cannot build new ones
during the capture (a host-to-device copy, which capture forbids) and must not let the graph
read tables a later step replaces; it says so, naming what moved, before launching anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._buckets import Bucket, where


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False with a torch built without CUDA)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError):
        return False


# What a backend says when a step under capture would need new address tables: building one
# is a host-to-device copy, which capture forbids, and the graph would keep reading tables
# that later steps replace.
_DURING_CAPTURE = (
    "a CUDA graph is being captured and the {backend} backend would need new address tables "
    "(a host-to-device copy, which capture forbids, and the graph would read tables that later "
    "steps replace): {what}. Keep the parameters and the gradient tensors of the warm-up steps "
    "(zero_grad(set_to_none=False), no new .data), or run eager warm-up steps again before capturing."
)
_NO_WARM_UP = "no step ran before the capture (run warm-up steps first: they build the tables)"


def keep_captured(cache: dict, name: str, *tensors: Tensor) -> None:
    """Keep tensors a CUDA graph was captured with referenced in `cache[name]` for the bucket's
    life: a table replaced or evicted afterwards must not be freed while a graph still reads it."""
    captured: dict[int, Tensor] = cache.setdefault(name, {})
    for t in tensors:
        captured.setdefault(id(t), t)


def describe(tensors: list[Tensor | None]) -> list[tuple | None]:
    """What capture_error compares: (address, shape, strides) of each tensor, None for None."""
    return [None if t is None else (t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors]


def capture_error(backend: str, b: Bucket, was: list[tuple | None] | None, now: list[Tensor | None],
                  what: str) -> RuntimeError:  # fmt: skip
    """The error for a step under capture whose parameters (what="parameter") or gradients
    (what="gradient") differ from `was` (describe() of the tensors the tables were built for;
    None when no table was built yet), naming the first tensor that changed and how."""
    if was is None:
        return RuntimeError(_DURING_CAPTURE.format(backend=backend, what=_NO_WARM_UP))
    for i, (p, t, before) in enumerate(zip(b.params, now, was)):
        after = None if t is None else (t.data_ptr(), tuple(t.shape), t.stride())
        if after == before:
            continue
        if before is None:
            change = "appeared (it had none)"
        elif after is None:
            change = "went away (.grad is None)"
        elif after[0] != before[0]:
            change = f"moved (address {before[0]:#x}, now {after[0]:#x})"
        else:
            change = f"changed shape or strides ({before[1]}, {before[2]}; now {after[1]}, {after[2]})"
        subject = where(i, p) if what == "parameter" else f"the gradient of {where(i, p)}"
        return RuntimeError(
            _DURING_CAPTURE.format(backend=backend, what=f"{subject} {change} since the graph's warm-up steps")
        )
    return RuntimeError(
        _DURING_CAPTURE.format(backend=backend, what=f"the {what}s changed since the graph's warm-up steps")
    )
