"""Which backend really steps what is visible: `backend_report()`, `repr(opt)`, a one-time
warning when a group is routed elsewhere or "auto" settles on a slower backend, and a pointer
to the GPU check the first time a GPU backend is used."""

from __future__ import annotations

import warnings

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadSGD, backends, optimizers

from .conftest import CPU

COMPILED_HERE = backends.resolve("auto:fused", {CPU})


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimizers, "_TOLD", set())  # "once per process" starts over per test


def _mixed() -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = LookaheadAdam([{"params": [a]}, {"params": [b]}], lr=0.1, backend=COMPILED_HERE)
    return opt, [a, b]


def test_report_names_the_backend_that_really_steps_each_bucket() -> None:
    opt, params = _mixed()
    before = opt.backend_report()
    assert [r["reason"] for r in before] == ["not stepped yet"] * 2
    assert [(r["group"], r["dtype"], r["tensors"], r["elements"]) for r in before] == [
        (0, "float32", 1, 12),
        (1, "float64", 1, 5),
    ]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="param group 1 .*float64.* is stepped by 'eager'"):
        opt.step()
    rows = opt.backend_report()
    assert rows[0]["backend"] == COMPILED_HERE and rows[0]["reason"] is None
    assert rows[1]["backend"] == "eager" and "float64" in rows[1]["reason"]
    assert all(r["requested"] == COMPILED_HERE for r in rows)
    text = repr(opt)
    assert f"Backend: {COMPILED_HERE}" in text and "group 1 float64 on cpu: eager" in text


def test_a_routed_group_warns_once() -> None:
    opt, params = _mixed()
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step()
    assert sum("is stepped by" in str(w.message) for w in caught) == 1
    assert all(w.filename == __file__ for w in caught)  # points at the user's line


def test_auto_falling_back_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    real = backends.unavailable
    monkeypatch.setattr(backends, "unavailable", lambda n, d: "not built here" if n == "cpu" else real(n, d))
    with pytest.warns(UserWarning, match="backend 'cpu' cannot run here \\(not built here\\); using 'foreach'"):
        opt = LookaheadSGD([torch.randn(3, requires_grad=True)], lr=0.1)
    assert opt.backend == "foreach"
    assert "requested auto" in repr(opt)


def test_the_first_gpu_backend_use_points_at_the_gpu_check() -> None:
    """Told once, for either GPU backend (no GPU here: the resolution is handed in)."""
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizers._note_resolution("LookaheadAdam", "cuda", "cuda", {cuda})
    assert len(caught) == 1 and "python -m lookahead_fused check --device cuda" in str(caught[0].message)


def test_nothing_is_said_when_the_preferred_backend_runs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = LookaheadSGD([torch.randn(3, requires_grad=True)], lr=0.1)
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        opt.step()
    assert "Backend:" in repr(opt)
