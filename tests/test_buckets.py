"""The flat state layout (lookahead_fused/_buckets.py): every parameter's state starts
16-byte aligned in every buffer, so one odd-sized tensor does not turn the accesses of every
later parameter scalar, and the padding between parameters belongs to nobody: no backend
ever writes it."""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadSGD
from lookahead_fused._buckets import COUNTER_KEYS, STATE_ALIGNMENT
from lookahead_fused.backends import triton as triton_backend

SIZES = (33, 1, 250, 7, 64)  # odd sizes first: unpadded, everything after them is misaligned


def _buckets(opt: torch.optim.Optimizer) -> list:
    return [b for buckets in opt._group_buckets for b in buckets]


@pytest.mark.parametrize(
    "dtype,state_dtype,slow_dtype",
    [
        (torch.float32, None, None),
        (torch.bfloat16, None, None),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32, torch.float16),
    ],
)
def test_every_parameters_state_starts_16_byte_aligned(dtype, state_dtype, slow_dtype) -> None:
    params = [torch.randn(n, dtype=dtype).requires_grad_() for n in SIZES]
    opt = LookaheadAdam(params, lr=1e-2, amsgrad=True, state_dtype=state_dtype, slow_dtype=slow_dtype, backend="eager")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the buckets exist from the first step on
    (b,) = _buckets(opt)
    for key, flat in b.flat.items():
        if key in COUNTER_KEYS:
            continue
        assert flat.data_ptr() % STATE_ALIGNMENT == 0
        for p, offset in zip(b.params, b.offsets):
            assert offset * flat.element_size() % STATE_ALIGNMENT == 0, (key, offset, flat.dtype)
            assert opt.state[p][key].data_ptr() % STATE_ALIGNMENT == 0
    assert b.numel - sum(SIZES) < len(SIZES) * STATE_ALIGNMENT  # at most 15 bytes a parameter


def test_padding_is_never_written(backend: str) -> None:
    """Zero padding stays zero through plain and sync steps with every kind of state: a kernel
    that walks past a parameter's end (or a whole-buffer op of foreach over NaN gradients)
    would change it."""
    torch.manual_seed(0)
    params = [torch.randn(n).requires_grad_() for n in SIZES]
    opts = [
        LookaheadAdam(params, lr=1e-2, amsgrad=True, k=2, inner_state="pullback", backend=backend),
        LookaheadSGD(params, lr=1e-2, momentum=0.9, k=2, inner_state="reset", backend=backend),
    ]
    for opt in opts:
        for _ in range(4):
            for p in params:
                p.grad = torch.full_like(p, float("nan"))  # NaN everywhere a kernel reads
            opt.step()
        (b,) = _buckets(opt)
        padding = torch.ones(b.numel, dtype=torch.bool)
        for p, offset in zip(b.params, b.offsets):
            padding[offset : offset + p.numel()] = False
        assert padding.any()
        for key, flat in b.flat.items():
            if key not in COUNTER_KEYS:
                assert torch.equal(flat[padding], torch.zeros_like(flat[padding])), f"padding of '{key}' written"


@pytest.mark.skipif(triton_backend.unavailable(torch.device("cpu")) is not None, reason="Triton cannot run here")
def test_odd_sized_parameters_keep_the_triton_kernels_aligned(monkeypatch) -> None:
    """A model whose first tensor has an odd size still gets the ALIGNED (128-bit) variant."""
    seen = []
    real = triton_backend.step_constexprs
    monkeypatch.setattr(triton_backend, "step_constexprs", lambda *a, **k: seen.append(k["aligned"]) or real(*a, **k))
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(n, dtype=dtype).requires_grad_() for n in SIZES]
        opt = LookaheadAdam(params, lr=1e-2, k=2, backend="triton")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert seen and all(seen)


def test_steady_steps_leave_the_garbage_collector_alone() -> None:
    """The layout checks of a step build a key of every parameter and gradient (tens of
    thousands of tuples for a big model) and drop it: none may live long enough for the cyclic
    collector to run over it, which would bring on full collections of the whole heap (a
    pause of 170 ms every few steps was measured with 10,000 tensors). The cpu backend
    allocates nothing else per step, so a steady step there runs no collection at all."""
    import gc

    torch.manual_seed(0)
    params = [torch.randn(4, requires_grad=True) for _ in range(2000)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LookaheadAdam(params, lr=1e-3, backend="cpu")
    for _ in range(3):
        opt.step()
    collections = []
    callback = lambda phase, info: collections.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        for _ in range(10):
            opt.step()
    finally:
        gc.callbacks.remove(callback)
    assert collections == []
