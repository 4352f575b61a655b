"""What the generic suite cannot see of the "triton" backend: its device path (capturable,
GradScaler) against the reference and without host synchronisation, tensors spread over
several blocks and programs, the cached tables, the fp64 fallback and availability.
The variant matrix on the host path runs in tests/test_backends.py; the bytes moved per
element in tests/test_traffic.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadSGD, backends, reference
from lookahead_fused.testing import TOLERANCES, Variant, run_against_reference, variants

from .nosync import HostSyncError, no_host_sync

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    backends.unavailable("triton", CPU) is not None, reason="needs triton under TRITON_INTERPRET=1"
)


@pytest.fixture
def triton_backend():  # noqa: ANN201
    from lookahead_fused.backends import triton as module

    return module


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch, triton_backend) -> None:  # noqa: ANN001
    """Several blocks per program and several programs per tensor, as on a GPU."""
    monkeypatch.setattr(triton_backend, "BLOCK", 32)
    monkeypatch.setattr(triton_backend, "CHUNK", 64)


def _with(variant: Variant, **options: object) -> Variant:
    return dataclasses.replace(variant, options=tuple(sorted({**variant.kwargs, **options}.items())))


def _assert_ok(report) -> None:  # noqa: ANN001
    assert report.ok, report.failures[:5]


# ---------------------------------------------------------------------------------------
# The device path against the reference.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name)
def test_capturable_matches_reference(variant: Variant, dtype: torch.dtype) -> None:
    """capturable=True: counters, sync decision (and α̂) on the device, with GradScaler's
    inputs and a skipped inf step."""
    _assert_ok(run_against_reference("triton", _with(variant, capturable=True), dtype, grad_scaler=True))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_capturable_tensor_lr_matches_reference(kind: str) -> None:
    base = next(v for v in variants() if v.kind == kind and v.kwargs.get("inner_state") == "pullback")
    variant = _with(base, capturable=True, lr=torch.tensor(base.kwargs["lr"]))
    _assert_ok(run_against_reference("triton", variant, torch.float32))


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize(
    "variant",
    [v for v in variants() if v.kwargs.get("inner_state") == "pullback" or v.kwargs.get("adaptive_alpha")],
    ids=lambda v: v.name,
)
def test_many_blocks_and_programs_per_tensor(variant: Variant, capturable: bool) -> None:
    """With 32-element blocks and 64-element chunks the test tensors (up to 108 elements) span
    several programs with partial last blocks; adaptive α sums partials over all of them."""
    _assert_ok(run_against_reference("triton", _with(variant, capturable=capturable), torch.float32, grad_scaler=True))


def test_float64_group_falls_back_to_foreach() -> None:
    variant = next(v for v in variants() if v.kind == "adam")
    _assert_ok(run_against_reference("triton", _with(variant, capturable=True), torch.float64, grad_scaler=True))


# ---------------------------------------------------------------------------------------
# No host synchronisation on the device path; found_inf changes nothing.
# ---------------------------------------------------------------------------------------


def _model(dtype: torch.dtype = torch.float32) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in [(6, 5), (7,), ()]]


@pytest.mark.parametrize("capturable", [False, True], ids=["found_inf", "capturable"])
@pytest.mark.parametrize("cls", [LookaheadSGD, LookaheadAdam], ids=lambda c: c.__name__)
def test_device_path_does_not_sync(cls: type, capturable: bool) -> None:
    params = _model()
    options = {"momentum": 0.9} if cls is LookaheadSGD else {"adaptive_alpha": True, "amsgrad": True}
    lr = torch.tensor(0.01) if capturable else 0.01
    opt = cls(params, lr=lr, k=2, backend="triton", capturable=capturable, inner_state="pullback", **options)
    grads = [torch.randn_like(p) for p in params]
    scale, found_inf = torch.tensor(2.0), torch.tensor(0.0)
    if not capturable:
        opt.grad_scale, opt.found_inf = scale, found_inf

    def step(grads_of: list[Tensor | None]) -> None:
        for p, g in zip(params, grads_of):
            p.grad = g
        opt.step()

    step(grads)  # builds the tables (a host-to-device copy, once)
    step([grads[0], None, grads[2]])  # and the gradient vector of this pattern
    before = [p.detach().clone() for p in params]
    with no_host_sync():
        for _ in range(5):  # plain and sync steps, a parameter with and without gradient
            step(grads)
            step([grads[0], None, grads[2]])
    assert all(not torch.equal(p, b) for p, b in zip(params, before))

    # The guard is live for this backend: a first step, which uploads its tables, is caught.
    fresh = cls(_model(), lr=0.01, k=2, backend="triton", capturable=True, **options)
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with no_host_sync(), pytest.raises(HostSyncError):
        fresh.step()


@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [LookaheadSGD, LookaheadAdam], ids=lambda c: c.__name__)
def test_found_inf_leaves_every_tensor_bit_identical(cls: type, dtype: torch.dtype, capturable: bool) -> None:
    params = _model(dtype)
    options = {"momentum": 0.9} if cls is LookaheadSGD else {"amsgrad": True}
    opt = cls(params, lr=0.05, k=2, backend="triton", capturable=capturable, inner_state="pullback", **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # one real step: the state is not all zeros
    for p in params:  # in place: the same gradients, so the cached gradient vector serves
        p.grad.fill_(float("nan"))
        p.grad.view(-1)[0] = float("inf")
    snapshot = [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    with no_host_sync():
        opt.step()  # would be the sync step (k = 2) had it not been skipped
    after = [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]
    assert len(after) == len(snapshot)
    for got, want in zip(after, snapshot):
        assert torch.equal(got.view(torch.uint8) if got.dim() else got, want.view(torch.uint8) if want.dim() else want)


# ---------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------


def _bucket(opt):  # noqa: ANN001, ANN202
    (bucket,) = opt._group_buckets[0]
    return bucket


def test_tables_are_reused_and_rebuilt_when_a_pointer_changes() -> None:
    params = _model()
    opt = LookaheadSGD(params, lr=0.1, momentum=0.9, k=2, backend="triton")
    grads = [torch.randn_like(p) for p in params]
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    bucket = _bucket(opt)
    assert bucket.backend_cache["builds"] == 1
    assert len(bucket.backend_cache["triton_grads"]) == 1

    params[1].grad = None  # a new gradient pattern: a new vector, the chunk table stays
    opt.step()
    assert bucket.backend_cache["builds"] == 1 and len(bucket.backend_cache["triton_grads"]) == 2

    params[0].data = params[0].data.clone()  # the parameter moved: the chunk table is rebuilt
    for p, g in zip(params, grads):
        p.grad = g
    want = params[0].detach() - 0.1 * (0.9 * opt.state[params[0]]["momentum_buffer"] + grads[0])
    opt.step()  # step 5: plain (k = 2, steps 2 and 4 synced)
    assert bucket.backend_cache["builds"] == 2
    torch.testing.assert_close(params[0].detach(), want, **TOLERANCES[torch.float32])


def test_gradient_with_other_strides_is_relaid_out() -> None:
    """A channels-last parameter with a contiguous gradient: the kernel reads a scratch copy
    laid out like the parameter, refreshed every step."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = p.detach().clone()
    opt = LookaheadAdam([p], lr=0.01, k=2, backend="triton")
    state = reference.init_state(ref, optimizer="adam")
    group = {**opt.param_groups[0]}
    for _ in range(3):
        g = torch.randn(p.shape, generator=gen)  # contiguous
        p.grad = g
        opt.step()
        reference.step_group("adam", [ref], [g], [state], group)
        torch.testing.assert_close(p.detach(), ref, **TOLERANCES[torch.float32])
    assert p.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------
# Availability.
# ---------------------------------------------------------------------------------------


def test_unavailable_explains_why(monkeypatch: pytest.MonkeyPatch, triton_backend) -> None:  # noqa: ANN001
    assert triton_backend.unavailable(CPU) is None  # under TRITON_INTERPRET=1
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in triton_backend.unavailable(CPU)
    if not torch.cuda.is_available():
        assert "cuda" in triton_backend.unavailable(torch.device("cuda")).lower()
    assert triton_backend.unavailable(torch.device("meta")) is not None
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", "triton is not importable: no module")
    assert triton_backend.unavailable(CPU) == "triton is not importable: no module"
