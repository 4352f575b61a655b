"""Glue for training frameworks (docs/integrations.md): timm, Lightning, Hugging Face.

Each submodule imports its framework only when it is used (`lookahead_fused.integrations.timm`
imports timm inside `register()`, the Lightning one imports Lightning at import), so this
package itself needs none of them. What is here is shared:

    lookahead_of(optimizer)   the lookahead_fused optimizer inside a framework's wrapper
    slow_weights(optimizer)   `with slow_weights(opt):` φ in the parameters, through wrappers
    sync_lookahead(optimizer) timm's out-of-schedule sync, for the fused classes and `Lookahead`
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from ..optimizers import _LookaheadOptimizer
from ..wrapper import Lookahead

__all__ = ["lookahead_of", "slow_weights", "sync_lookahead"]

# Where frameworks keep the optimizer they wrap: accelerate's AcceleratedOptimizer and
# transformers' (`.optimizer`), Lightning's LightningOptimizer (`._optimizer`).
_WRAPPED = ("optimizer", "_optimizer")


def lookahead_of(optimizer: Any) -> _LookaheadOptimizer | Lookahead | None:
    """The LookaheadSGD/Adam/AdamW or `Lookahead` that `optimizer` is or wraps (accelerate's
    `AcceleratedOptimizer`, Lightning's `LightningOptimizer`, nested), or None when there is
    none (another optimizer, or None)."""
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        if isinstance(optimizer, (_LookaheadOptimizer, Lookahead)):
            return optimizer
        found = (getattr(optimizer, attr, None) for attr in _WRAPPED)
        inner = next((o for o in found if isinstance(o, Optimizer)), None)
        if inner is None:
            return None
        optimizer = inner
    return None


@contextlib.contextmanager
def slow_weights(optimizer: Any) -> Iterator[None]:
    """`optimizer.slow_weights()` of the Lookahead optimizer inside `optimizer` (see
    `lookahead_of`); nothing happens when there is none, or when its slow weights are in the
    parameters already (a save inside an evaluation), so framework hooks can nest."""
    la = lookahead_of(optimizer)
    if la is None or la._in_slow_weights:
        yield
        return
    with la.slow_weights():
        yield


@torch.no_grad()
def sync_lookahead(optimizer: Any) -> None:
    """An out-of-schedule sync, φ ← φ + α (θ − φ), θ ← φ, as timm's `sync_lookahead`: the
    fused classes' own method, or for the generic `Lookahead` the same through its `_sync`
    (every group, the counters left alone). Nothing happens without a Lookahead optimizer."""
    la = lookahead_of(optimizer)
    if la is None:
        return
    if isinstance(la, _LookaheadOptimizer):
        la.sync_lookahead()
        return
    if la._in_slow_weights:
        raise RuntimeError("sync_lookahead() inside `with optimizer.slow_weights():`")
    stepped = [g for g in la.param_groups if any(p in la._lookahead_state for p in g["params"])]
    la._init_slow_weights()  # φ ← θ for a parameter added since, as its first step would
    for group in stepped:
        la._sync(group)
