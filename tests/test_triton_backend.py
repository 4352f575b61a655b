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


# ---------------------------------------------------------------------------------------
# The ALIGNED variant (128-bit accesses on a GPU, tests/test_codegen.py).
# ---------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel of lookahead_fused.triton_kernels: records each launch's
    arguments (and `check(name, args)`'s verdict), then launches the real kernel."""

    def __init__(self, name: str, kernel, launches: list, check=None) -> None:  # noqa: ANN001
        self.name, self.kernel, self.launches, self.check = name, kernel, launches, check

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        def launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.launches.append((self.name, kwargs, self.check(args, kwargs) if self.check else None))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _record_launches(monkeypatch: pytest.MonkeyPatch, check=None) -> list:  # noqa: ANN001
    from lookahead_fused import triton_kernels as kernels

    launches: list = []
    for name in ("lookahead_step_kernel", "advance_counters_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder(name, getattr(kernels, name), launches, check))
    return launches


def _aligned_run(cls: type, dtype: torch.dtype, options: dict, steps: int = 5) -> list[Tensor]:
    """Parameters whose sizes are multiples of 8 (every row aligned) spanning full and partial
    blocks and several programs (small_chunks): the tensors after `steps` steps."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in [(8, 12), (40,), (16,)]]
    opt = cls(params, lr=0.01, k=2, backend="triton", **options)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (step + i) % 3 == 2 else torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]


_ALIGNED_CASES = [
    (LookaheadSGD, {"momentum": 0.9, "nesterov": True, "inner_state": "pullback"}),
    (LookaheadAdam, {"amsgrad": True, "adaptive_alpha": True, "inner_state": "pullback"}),
    (LookaheadAdam, {"weight_decay": 0.1, "inner_state": "reset", "capturable": True}),
]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cls", "options"), _ALIGNED_CASES, ids=["sgd", "adam_adaptive", "adam_capturable"])
def test_aligned_variant_is_bit_identical_to_the_unaligned_one(
    monkeypatch: pytest.MonkeyPatch,
    triton_backend,
    cls: type,
    options: dict,
    dtype: torch.dtype,  # noqa: ANN001
) -> None:
    """Aligned rows get ALIGNED=True (unmasked full blocks, a masked tail) and step exactly as
    the masked loop of the unaligned variant does, which the other tests check against the
    reference."""
    launches = _record_launches(monkeypatch)
    aligned = _aligned_run(cls, dtype, options)
    steps = [kw for name, kw, _ in launches if name == "lookahead_step_kernel"]
    assert steps and all(kw["ALIGNED"] for kw in steps)

    launches.clear()
    monkeypatch.setattr(triton_backend, "_ALIGNMENT", 1 << 40)  # no address qualifies
    unaligned = _aligned_run(cls, dtype, options)
    steps = [kw for name, kw, _ in launches if name == "lookahead_step_kernel"]
    assert steps and not any(kw["ALIGNED"] for kw in steps)
    for got, want in zip(aligned, unaligned, strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dim() else got, want.view(torch.uint8) if want.dim() else want)


def test_unaligned_parameter_or_gradient_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter that is a view at an odd offset, or a gradient that is one, makes its
    bucket take the unaligned variant; results still match the reference."""
    launches = _record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(33, generator=gen)
    p = torch.nn.Parameter(storage[1:].view(4, 8))  # 4 bytes past a 64-byte boundary
    q = torch.nn.Parameter(torch.randn(16, generator=gen))
    ref = [p.detach().clone(), q.detach().clone()]
    opt = LookaheadAdam([p, q], lr=0.01, k=2, backend="triton")
    state = [reference.init_state(r, optimizer="adam") for r in ref]
    group = {**opt.param_groups[0]}
    seen = []
    for step in range(4):
        if step == 2:  # from here p is aligned again, and q's gradient is not
            p.data = p.data.clone()
        grads = [torch.randn(4, 8, generator=gen), torch.randn(17, generator=gen)[1:] if step >= 2 else None]
        grads[1] = torch.randn(16, generator=gen) if grads[1] is None else grads[1]
        p.grad, q.grad = grads
        launches.clear()
        opt.step()
        seen.append({kw["ALIGNED"] for name, kw, _ in launches if name == "lookahead_step_kernel"})
        reference.step_group("adam", ref, grads, state, group)
        for got, want in zip([p, q], ref):
            torch.testing.assert_close(got.detach(), want, **TOLERANCES[torch.float32])
    assert seen == [{False}, {False}, {False}, {False}]

    p.grad, q.grad = torch.randn(4, 8, generator=gen), torch.randn(16, generator=gen)  # both aligned
    launches.clear()
    opt.step()
    assert {kw["ALIGNED"] for name, kw, _ in launches if name == "lookahead_step_kernel"} == {True}


def test_amsgrad_max_propagates_nan() -> None:
    """torch.maximum propagates NaN into max_exp_avg_sq (and so into θ); tl.maximum's default
    would keep the old maximum and let the step go on as if nothing happened."""
    p = torch.nn.Parameter(torch.ones(8))
    ref = p.detach().clone()
    opt = LookaheadAdam([p], lr=0.01, k=3, amsgrad=True, backend="triton")
    state = [reference.init_state(ref, optimizer="adam", amsgrad=True)]
    group = {**opt.param_groups[0]}
    for step in range(2):
        g = torch.full((8,), 0.5)
        if step == 1:
            g[3] = float("nan")
        p.grad = g
        opt.step()
        reference.step_group("adam", [ref], [g], state, group)
    vmax = opt.state[p]["max_exp_avg_sq"]
    assert vmax[3].isnan() and state[0]["max_exp_avg_sq"][3].isnan()
    torch.testing.assert_close(vmax, state[0]["max_exp_avg_sq"], equal_nan=True, **TOLERANCES[torch.float32])
    torch.testing.assert_close(p.detach(), ref, equal_nan=True, **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------
# Device placement, without a GPU: buckets that claim to be on cuda:0 and cuda:1.
# ---------------------------------------------------------------------------------------


def test_every_launch_runs_on_its_buckets_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each launch (both adaptive-α passes and the counter kernel) happens under
    torch.cuda.device(bucket.device), with every tensor argument (α̂ included) on that device.
    The buckets' tensors stay on the CPU (the interpreter runs the kernels); what device each
    claims is tracked beside them, and Tensor.to a CUDA device makes a CPU copy that claims it."""
    import contextlib

    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(8, 4, generator=gen).requires_grad_(),
        torch.randn(16, generator=gen).bfloat16().requires_grad_(),
    ]
    opt = LookaheadAdam(params, lr=0.01, k=1, adaptive_alpha=True, backend="triton")  # k = 1: every step syncs
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # builds the tables and caches on the CPU

    claimed: dict[int, torch.device] = {}  # id(tensor) -> the device it stands for
    keep: list[Tensor] = []  # keeps the ids above alive

    def claim(t: Tensor, device: torch.device) -> Tensor:
        claimed[id(t)] = device
        keep.append(t)
        return t

    def tensors(x: object):  # noqa: ANN202
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    buckets = opt._group_buckets[0]
    assert len(buckets) == 2
    for i, bucket in enumerate(buckets):
        bucket.device = torch.device("cuda", i)
        for t in [*tensors(bucket.flat), *tensors(bucket.backend_cache)]:
            claim(t, bucket.device)

    to = torch.Tensor.to

    def fake_to(self: Tensor, *args: object, **kwargs: object) -> Tensor:
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is None or torch.device(target).type != "cuda":
            return to(self, *args, **kwargs)
        target = torch.device(target)
        if claimed.get(id(self)) == target:
            return self
        rest = {k: v for k, v in kwargs.items() if k != "device"}
        return claim(to(self, *[a for a in args if not isinstance(a, (str, torch.device))], **rest).clone(), target)

    current: list[torch.device] = []

    @contextlib.contextmanager
    def fake_device(device: torch.device):  # noqa: ANN202
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    def check(args: tuple, kwargs: dict) -> tuple:
        devices = {claimed.get(id(t), t.device) for t in [*args, *kwargs.values()] if isinstance(t, Tensor)}
        return (current[-1] if current else None), devices

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    launches = _record_launches(monkeypatch, check)
    opt.step()

    names = [name for name, _, _ in launches]
    assert names.count("lookahead_step_kernel") == 4 and names.count("advance_counters_kernel") == 2
    on = set()
    for name, _, (device, devices) in launches:
        assert device is not None and device.type == "cuda", f"{name} launched outside torch.cuda.device"
        assert devices == {device}, f"{name} launched on {device} with tensors on {devices}"
        on.add(device)
    assert on == {torch.device("cuda", 0), torch.device("cuda", 1)}
