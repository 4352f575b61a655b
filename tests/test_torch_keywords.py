"""torch.optim's keywords, accepted so that swapping the class name is all a user changes:
`fused=`, `foreach=`, `differentiable=`, `capturable=` and, for LookaheadAdam,
`decoupled_weight_decay=` map to what a torch user expects (README "torch.optim keywords")."""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends

from .conftest import CPU

CLASSES = (LookaheadSGD, LookaheadAdam, LookaheadAdamW)
# What "fused" means on this machine: the fastest compiled backend "auto" would take.
FUSED_HERE = next(n for n in backends.AUTO_ORDER["cpu"] if n in backends.COMPILED)


def _params() -> list[torch.Tensor]:
    return [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "keywords,want",
    [
        (dict(fused=True), FUSED_HERE),
        (dict(foreach=True), "foreach"),
        (dict(fused=False), "foreach"),
        (dict(foreach=False), FUSED_HERE),
        (dict(fused=False, foreach=False), "eager"),
        (dict(fused=None, foreach=None), backends.resolve("auto", {CPU})),
        (dict(fused=True, backend="cpu"), "cpu"),
        (dict(foreach=True, backend="foreach"), "foreach"),
    ],
)
def test_fused_and_foreach_pick_the_backend_a_torch_user_expects(cls, keywords: dict, want: str) -> None:
    opt = cls(_params(), lr=0.01, **keywords)
    assert opt.backend == want
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    opt.step()  # and it steps


@pytest.mark.parametrize(
    "keywords,error,match",
    [
        (dict(fused=True, foreach=True), ValueError, "cannot be `True` together"),
        (dict(fused=True, backend="foreach"), ValueError, "contradicts"),
        (dict(foreach=True, backend="cpu"), ValueError, "contradicts"),
        (dict(fused=False, backend="cpu"), ValueError, "contradicts"),
        (dict(differentiable=True), NotImplementedError, "differentiable=True"),
    ],
)
def test_keywords_that_cannot_be_honoured_are_refused(keywords: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LookaheadAdam(_params(), **keywords)


def test_fused_true_without_a_compiled_backend_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """As torch.optim's fused=True on a device without a fused kernel: an error, not a silent
    foreach."""
    real = backends.unavailable
    monkeypatch.setattr(backends, "unavailable", lambda n, d: "not built" if n in backends.COMPILED else real(n, d))
    with pytest.raises(RuntimeError, match="fused=True: no backend"):
        LookaheadSGD(_params(), lr=0.1, fused=True)


@pytest.mark.parametrize("backend", ["eager", "foreach", FUSED_HERE])
def test_decoupled_weight_decay_makes_lookahead_adam_adamw(backend: str) -> None:
    """LookaheadAdam(decoupled_weight_decay=True) steps exactly as LookaheadAdamW, as
    torch.optim.Adam(decoupled_weight_decay=True) steps as AdamW."""
    a, b = _params(), _params()
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    adam = LookaheadAdam(a, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, k=2, alpha=0.7, backend=backend)
    adamw = LookaheadAdamW(b, lr=0.05, weight_decay=0.1, k=2, alpha=0.7, backend=backend)
    l2 = LookaheadAdam([x.detach().clone().requires_grad_() for x in a], lr=0.05, weight_decay=0.1, k=2, alpha=0.7,
                       backend=backend)  # fmt: skip
    for _ in range(4):
        for x, y, z in zip(a, b, l2.param_groups[0]["params"]):
            g = torch.randn_like(x)
            x.grad, y.grad, z.grad = g.clone(), g.clone(), g.clone()
        adam.step(), adamw.step(), l2.step()
    for x, y, z in zip(a, b, l2.param_groups[0]["params"]):
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)  # L2 weight decay is something else
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], decoupled_weight_decay=True)  # torch has the keyword


def test_adamw_refuses_coupled_weight_decay() -> None:
    with pytest.raises(ValueError, match="always decoupled"):
        LookaheadAdamW(_params(), decoupled_weight_decay=False)
    LookaheadAdamW(_params(), decoupled_weight_decay=True)


def test_capturable_is_a_keyword_of_every_class() -> None:
    for cls in CLASSES:
        assert cls(_params(), capturable=True).param_groups[0]["capturable"] is True
