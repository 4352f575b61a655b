"""The body of `optimizer.slow_weights()`, shared by the fused classes and the wrapper.

Both keep φ somewhere else (bucket views, a side dict); they hand this helper the
(parameter, slow weights) pairs and it swaps φ in for the body of the `with`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._buckets import is_sharded


@contextlib.contextmanager
def swap_slow_weights(optimizer: Optimizer, pairs: Iterable[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Put the slow weights φ into the parameters for the body of the `with`, then put the
    fast weights back, bit for bit, also when the body raises.

    Where φ has the parameter's dtype and layout the two are swapped by reference
    (`param.data`), with no copy; otherwise (fp32 φ of a bf16 parameter) the fast weights
    wait in a temporary copy in the parameter's dtype. Sharded parameters (FSDP2's DTensors)
    are always copied: FSDP2 all-gathers from the shard's own storage, not from `.data`.
    `pairs` is consumed only after the re-entry check. `optimizer._in_slow_weights` is set
    meanwhile: its `step()` refuses to run while the parameters hold φ."""
    if optimizer._in_slow_weights:  # type: ignore[attr-defined]
        raise RuntimeError("slow_weights() is already active")
    swapped: list[tuple[Tensor, Tensor, bool]] = []
    optimizer._in_slow_weights = True  # type: ignore[attr-defined]
    try:
        with torch.no_grad():
            for p, slow in pairs:
                if slow.dtype == p.dtype and slow.stride() == p.stride() and not is_sharded(p):
                    swapped.append((p, p.data, True))
                    p.data = slow
                else:
                    swapped.append((p, p.detach().clone(), False))
                    p.copy_(slow)
        yield
    finally:
        # Reversed, so that a parameter listed twice ends with its first saved value.
        with torch.no_grad():
            for p, fast, by_reference in reversed(swapped):
                if by_reference:
                    p.data = fast
                else:
                    p.copy_(fast)
        optimizer._in_slow_weights = False  # type: ignore[attr-defined]
