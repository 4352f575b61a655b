"""A parameter whose memory layout changes after the optimizer has stepped keeps its state:
`model.to(memory_format=torch.channels_last)` mid-training, or `.data` replaced by a tensor of
the same shape with other strides. The compiled kernels walk a parameter and its state side
by side in memory, so the state must be re-laid out in the parameter's new order (values
kept), on every backend, exactly as the reference (which works in logical indices) sees it."""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadSGD
from lookahead_fused.testing import TOLERANCES

CHANGES = ("channels_last", "channels_last_and_back", "data_other_strides")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))


def _change(model: torch.nn.Module, change: str, step: int) -> None:
    if change == "channels_last" and step == 3:
        model.to(memory_format=torch.channels_last)
    elif change == "channels_last_and_back" and step in (3, 6):
        model.to(memory_format=torch.channels_last if step == 3 else torch.contiguous_format)
    elif change == "data_other_strides" and step == 3:
        w = model[2].weight  # (4, 8, 3, 3): same shape, transposed memory order
        w.data = w.data.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)


def _run(backend: str, change: str, make) -> tuple[list[torch.Tensor], list[dict], torch.optim.Optimizer]:
    model = _model()
    opt = make(model.parameters(), backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    history = []
    for step in range(9):
        _change(model, change, step)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        history.append(
            [p.detach().clone() for p in model.parameters()]
            + [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
        )
    return history, list(model.parameters()), opt


OPTIMIZERS = {
    "adam": lambda params, backend: LookaheadAdam(params, lr=1e-2, k=2, alpha=0.3, backend=backend),
    "sgd": lambda params, backend: LookaheadSGD(
        params, lr=1e-2, momentum=0.9, k=2, alpha=0.3, inner_state="pullback", backend=backend
    ),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("change", CHANGES)
def test_state_follows_a_layout_change(backend: str, change: str, kind: str) -> None:
    want, _, _ = _run("eager", change, OPTIMIZERS[kind])
    got, params, opt = _run(backend, change, OPTIMIZERS[kind])
    tol = TOLERANCES[torch.float32]
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            if isinstance(a, dict):
                for key in b:
                    torch.testing.assert_close(a[key], b[key], **tol, msg=f"step {step} param {i - len(g) // 2} {key}")
            else:
                torch.testing.assert_close(a, b, **tol, msg=f"step {step} param {i}")
    # The state lies in the parameter's memory order, and the tensors users hold stay valid.
    for p in params:
        for key, t in opt.state[p].items():
            if t.dim():
                assert t.stride() == p.stride(), (key, t.stride(), p.stride())


def test_state_tensors_keep_their_identity_across_a_layout_change() -> None:
    model = _model()
    opt = LookaheadAdam(model.parameters(), lr=1e-2, k=2, backend="eager")
    model(torch.randn(1, 3, 9, 9)).sum().backward()
    opt.step()
    w = model[0].weight
    held = opt.state[w]["exp_avg"]
    before = held.clone()
    model.to(memory_format=torch.channels_last)
    opt.step()
    assert opt.state[w]["exp_avg"] is held and held.stride() == w.stride()
    assert not torch.equal(held, before)  # it kept being updated


def test_a_gradient_kept_across_a_parameter_relayout_is_read_in_the_new_order(backend: str) -> None:
    """The same gradient tensor (same address, shape, strides) before and after its parameter
    is re-laid out (`.data` transposed in memory): what the kernels read for it depends on the
    parameter's layout too (a gradient laid out unlike its parameter is copied into the
    parameter's order), so nothing cached for the gradient alone may be reused. Found by the
    mutation fuzz, where the allocator handed a new gradient the old one's address."""
    torch.manual_seed(0)
    p = torch.randn(6, 5, requires_grad=True)
    ref = p.detach().clone()
    opt = LookaheadAdam([p], lr=0.05, k=3, alpha=0.7, backend=backend)
    want = LookaheadAdam([ref.requires_grad_()], lr=0.05, k=3, alpha=0.7, backend="eager")
    g = torch.randn(6, 5)  # contiguous, kept for every step
    for step in range(6):
        if step == 2:
            p.data = p.data.t().contiguous().t()  # the parameter's memory order changes, not its values
        p.grad, ref.grad = g, g.clone()
        opt.step()
        want.step()
        torch.testing.assert_close(p, ref, **TOLERANCES[torch.float32], msg=f"step {step + 1}")
        for key in ("exp_avg", "exp_avg_sq", "slow_weights"):
            torch.testing.assert_close(opt.state[p][key], want.state[ref][key], **TOLERANCES[torch.float32])
