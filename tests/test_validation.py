"""Bad input: constructor errors, param groups added later, and gradients that step() must
refuse before it changes anything.

Where torch.optim has the same check, its own message is the expected text, so the two
stay identical without this file copying either.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends

from .test_state import assert_bitwise_equal, snapshot

TORCH_COUNTERPART = {LookaheadSGD: torch.optim.SGD, LookaheadAdam: torch.optim.Adam, LookaheadAdamW: torch.optim.AdamW}
ALL = list(TORCH_COUNTERPART)
ADAMS = [LookaheadAdam, LookaheadAdamW]


def _name(x: Any) -> str:
    return x.__name__ if isinstance(x, type) else repr(x)


def _kwargs_id(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _param(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(3, dtype=dtype, requires_grad=dtype.is_floating_point or dtype.is_complex)


# ---------------------------------------------------------------------------------------
# Constructor errors shared with torch.optim: the message must be torch.optim's.
# ---------------------------------------------------------------------------------------

_TORCH_CHECKED = {
    LookaheadSGD: [
        dict(lr=-1.0), dict(weight_decay=-0.1), dict(momentum=-0.5),
        dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
    ],
    LookaheadAdam: [
        dict(lr=-1.0), dict(weight_decay=-0.1), dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)), dict(betas=(0.9, 1.0)), dict(betas=(0.9, -0.5)),
    ],
}  # fmt: skip
_TORCH_CHECKED[LookaheadAdamW] = _TORCH_CHECKED[LookaheadAdam]


@pytest.mark.parametrize(
    "cls, kwargs",
    [(cls, kwargs) for cls, cases in _TORCH_CHECKED.items() for kwargs in cases],
    ids=lambda x: _name(x) if isinstance(x, type) else _kwargs_id(x),
)
def test_constructor_error_matches_torch_optim(backend: str, cls: type, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as want:
        TORCH_COUNTERPART[cls]([_param()], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        cls([_param()], backend=backend, **kwargs)


@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_empty_parameter_list(backend: str, cls: type) -> None:
    with pytest.raises(ValueError) as want:
        TORCH_COUNTERPART[cls]([])
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        cls([], backend=backend)


# ---------------------------------------------------------------------------------------
# Lookahead's own hyperparameters.
# ---------------------------------------------------------------------------------------

_LOOKAHEAD_CHECKED = [
    *[(dict(k=k), "Invalid k") for k in (0, -1, 1.5, True, "3")],
    *[(dict(alpha=a), "Invalid alpha") for a in (0.0, -0.5, 1.5, math.nan)],
    (dict(inner_state="bogus"), "Invalid inner_state: 'bogus' .*'maintain', 'reset', 'pullback'"),
    *[(dict(state_dtype=d), "Invalid state_dtype") for d in (torch.int32, torch.complex64, "float32")],
    *[(dict(slow_dtype=d), "Invalid slow_dtype") for d in (torch.int64, torch.bool)],
]


@pytest.mark.parametrize(
    "kwargs, message", [pytest.param(*case, id=_kwargs_id(case[0])) for case in _LOOKAHEAD_CHECKED]
)
@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_lookahead_hyperparameter_errors(backend: str, cls: type, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls([_param()], backend=backend, **kwargs)


def test_negative_dampening(backend: str) -> None:
    # torch.optim.SGD accepts it (the gradient then weighs 1 - dampening > 1): no message to borrow.
    with pytest.raises(ValueError, match="Invalid dampening value: -0.1"):
        LookaheadSGD([_param()], momentum=0.9, dampening=-0.1, backend=backend)


@pytest.mark.parametrize("alpha_low", [0.0, -0.1, 1.5])
@pytest.mark.parametrize("cls", ADAMS, ids=_name)
def test_alpha_low_out_of_range(backend: str, cls: type, alpha_low: float) -> None:
    with pytest.raises(ValueError, match="Invalid alpha_low"):
        cls([_param()], adaptive_alpha=True, alpha_low=alpha_low, backend=backend)


@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_unknown_backend_lists_the_choices(cls: type) -> None:
    with pytest.raises(ValueError, match="Invalid backend: 'bogus'") as err:
        cls([_param()], backend="bogus")
    for choice in ("auto", *backends.NAMES):
        assert repr(choice) in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex32], ids=str)
@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_non_floating_parameters(backend: str, cls: type, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=f"floating-point and complex parameters only, got {dtype}"):
        cls([_param(), _param(dtype)], backend=backend)


@pytest.mark.parametrize("bad", [dict(k=0), dict(alpha=2.0), dict(inner_state="bogus")], ids=str)
@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_add_param_group_validates(backend: str, cls: type, bad: dict[str, Any]) -> None:
    """A rejected group is not added: the optimizer keeps stepping its valid groups."""
    p = _param()
    opt = cls([p], backend=backend, k=2)
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": [_param()], **bad})
    assert len(opt.param_groups) == 1
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["lookahead_step"].item() == 1


# ---------------------------------------------------------------------------------------
# Gradients step() refuses, before anything changes.
# ---------------------------------------------------------------------------------------


def _two_layer_setup(cls: type, backend: str, layout: str) -> tuple[torch.optim.Optimizer, nn.Module, nn.Module]:
    """A Linear and a sparse Embedding, in one group or in two (the refused gradient in the
    second group: the first group must not be stepped either). One valid step is taken, with
    k=2, so the refused step would be a sync."""
    torch.manual_seed(0)
    dense, emb = nn.Linear(3, 2), nn.Embedding(10, 3, sparse=True)
    params = [dense.weight, dense.bias, emb.weight]
    groups = [{"params": params}] if layout == "one_group" else [{"params": params[:2]}, {"params": params[2:]}]
    opt = cls(groups, lr=0.1, k=2, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
    return opt, dense, emb


@pytest.mark.parametrize("layout", ["one_group", "two_groups"])
@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_sparse_gradient_raises_before_any_change(backend: str, cls: type, layout: str) -> None:
    opt, dense, emb = _two_layer_setup(cls, backend, layout)
    before = snapshot(opt)
    dense(emb(torch.tensor([1, 4]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


@pytest.mark.parametrize("layout", ["one_group", "two_groups"])
@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_wrong_shape_gradient_raises_before_any_change(backend: str, cls: type, layout: str) -> None:
    opt, dense, emb = _two_layer_setup(cls, backend, layout)
    before = snapshot(opt)
    for p in (dense.weight, dense.bias):
        p.grad = torch.ones_like(p)
    # torch checks the shape when .grad is assigned, not when .grad.data is: a real way in.
    emb.weight.grad = torch.ones_like(emb.weight)
    emb.weight.grad.data = torch.ones(7)
    with pytest.raises(RuntimeError, match=r"gradient of shape \(7,\) for a parameter of shape \(10, 3\)"):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g.flatten()[:7], r"gradient of shape \(7,\) for a parameter of shape \(10, 3\)"),
        (lambda g: g.view(torch.int32), "gradient of dtype torch.int32 for a parameter of dtype torch.float32"),
    ],
    ids=["shape", "dtype"],
)
@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_gradient_changed_in_place_after_steady_steps(backend: str, cls: type, change: Any, message: str) -> None:
    """The front-end checks run again whenever a gradient's metadata changes, even when the
    gradient tensor and its address stay the same (the checks are cached between steps)."""
    opt, dense, emb = _two_layer_setup(cls, backend, "one_group")
    for p in (dense.weight, dense.bias, emb.weight):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()  # steady: the same gradient tensors, the checks' cache holds
    before = snapshot(opt)
    g = emb.weight.grad
    address = g.data_ptr()
    g.data = change(g.data)
    assert g.data_ptr() == address
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)
