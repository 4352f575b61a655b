"""torch.amp.GradScaler with the Lookahead optimizers, in a real (tiny) training loop.

The optimizers declare `_step_supports_amp_scaling`: GradScaler then hands them its scale
and found_inf instead of unscaling the gradients itself, and they unscale inside the step.
init_scale is a power of two, so scaling and unscaling are exact and the scaled loop must
match the unscaled one within TOLERANCES.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lookahead_fused import LookaheadAdam, LookaheadSGD

from .test_state import assert_bitwise_equal, assert_close, snapshot

K = 3
INIT_SCALE = 2.0**10
KINDS: dict[str, tuple[type, dict[str, Any]]] = {
    "adam": (LookaheadAdam, dict(lr=0.01)),
    "sgd": (LookaheadSGD, dict(lr=0.05, momentum=0.9)),
}

kinds = pytest.mark.parametrize("kind", list(KINDS))
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)


def _setup(kind: str, backend: str, dtype: torch.dtype) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    cls, hyper = KINDS[kind]
    return model, cls(model.parameters(), k=K, backend=backend, **hyper)


def _backward(model: nn.Module, step: int, scaler: torch.amp.GradScaler | None) -> None:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
    dtype = next(model.parameters()).dtype
    loss = (model(x.to(dtype)).float() - y).pow(2).mean()
    (loss if scaler is None else scaler.scale(loss)).backward()


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    scaler: torch.amp.GradScaler | None,
    clip: float | None = None,
) -> None:
    """The usual AMP loop; with `clip`, the gradient-clipping pattern (unscale_ first)."""
    for step in steps:
        opt.zero_grad()
        _backward(model, step, scaler)
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)


@dtypes
@kinds
def test_scaled_loop_matches_unscaled_loop(backend: str, kind: str, dtype: torch.dtype) -> None:
    plain_model, plain_opt = _setup(kind, backend, dtype)
    _train(plain_model, plain_opt, range(7), None)

    model, opt = _setup(kind, backend, dtype)
    assert opt._step_supports_amp_scaling is True
    scaler = _scaler()
    _train(model, opt, range(7), scaler)
    assert scaler.get_scale() == INIT_SCALE, "no step may have seen an inf"
    assert_close(snapshot(opt), snapshot(plain_opt), dtype)


@dtypes
@kinds
def test_step_with_inf_gradient_changes_nothing(backend: str, kind: str, dtype: torch.dtype) -> None:
    """The inf step comes right before a sync: had the counter moved, the next step would
    not sync. Parameters, every state tensor and both counters stay bit for bit."""
    model, opt = _setup(kind, backend, dtype)
    scaler = _scaler()
    _train(model, opt, range(K - 1), scaler)
    before = snapshot(opt)

    opt.zero_grad()
    _backward(model, K - 1, scaler)
    model[0].weight.grad[0, 0] = float("inf")  # what an overflow in the backward leaves
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < INIT_SCALE
    assert_bitwise_equal(snapshot(opt), before)
    for p in model.parameters():
        assert opt.state[p]["lookahead_step"].item() == K - 1

    _train(model, opt, range(K, K + 1), scaler)  # the K-th real step: a sync
    for p in model.parameters():
        assert torch.equal(p, opt.state[p]["slow_weights"].to(dtype))


@kinds
def test_step_leaves_grad_scaled(backend: str, kind: str) -> None:
    """The unscaling happens inside the step: `.grad` still holds the scaled gradient."""
    model, opt = _setup(kind, backend, torch.float32)
    scaler = _scaler()
    _backward(model, 0, scaler)
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


@dtypes
@kinds
def test_unscale_then_clip_then_step(backend: str, kind: str, dtype: torch.dtype) -> None:
    """scaler.unscale_(opt) before scaler.step(opt): the step must not unscale again."""
    clip = 0.1
    model, opt = _setup(kind, backend, dtype)
    _backward(model, 0, None)
    assert nn.utils.get_total_norm([p.grad for p in model.parameters()]) > clip, "clipping would be a no-op"

    plain_model, plain_opt = _setup(kind, backend, dtype)
    _train(plain_model, plain_opt, range(7), None, clip=clip)
    model, opt = _setup(kind, backend, dtype)
    _train(model, opt, range(7), _scaler(), clip=clip)
    assert_close(snapshot(opt), snapshot(plain_opt), dtype)
