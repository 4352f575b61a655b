"""The "foreach" backend: the reference's math on both of its paths (host and device), the
device path's promise of no host sync, the host path's promise not to touch the slow weights
on plain steps, and found_inf steps that change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD
from lookahead_fused.testing import Variant, make_params, run_against_reference, variants

from .nosync import HostSyncError, no_host_sync

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _with(v: Variant, **options: Any) -> Variant:
    return Variant(v.kind, tuple(sorted({**v.kwargs, **options}.items())), v.groups)


# (a) Every variant, dtype, GradScaler on/off, capturable on/off, against the reference.
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("grad_scaler", [False, True], ids=["", "scaler"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name)
def test_matches_reference(variant: Variant, dtype: torch.dtype, grad_scaler: bool, capturable: bool) -> None:
    if capturable:
        variant = _with(variant, capturable=True)
    report = run_against_reference("foreach", variant, dtype, grad_scaler=grad_scaler)
    assert report.ok, "\n".join(report.failures[:5])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_capturable_tensor_lr_matches_reference(kind: str) -> None:
    base = next(v for v in variants() if v.kind == kind and v.kwargs.get("weight_decay"))
    variant = _with(base, capturable=True, lr=torch.tensor(base.kwargs["lr"]))
    report = run_against_reference("foreach", variant, grad_scaler=True)
    assert report.ok, "\n".join(report.failures[:5])


# Parameters and state in different dtypes: every tensor read into the math dtype and rounded
# once when written back, on both paths.
DTYPE_CASES = [
    (torch.bfloat16, dict(state_dtype=torch.bfloat16, slow_dtype=torch.bfloat16)),
    (torch.float32, dict(slow_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype=torch.float64)),
    (torch.float64, {}),
    (torch.float64, dict(slow_dtype=torch.float32)),
]


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize(("dtype", "options"), DTYPE_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("variant", [v for v in variants() if v.groups == 1][1::5], ids=lambda v: v.name)
def test_dtype_overrides_match_reference(
    variant: Variant, dtype: torch.dtype, options: dict[str, torch.dtype], capturable: bool
) -> None:
    report = run_against_reference("foreach", _with(variant, capturable=capturable, **options), dtype, grad_scaler=True)
    assert report.ok, "\n".join(report.failures[:5])


# A few optimizers that between them use every state entry and every sync policy.
def _optimizers(params: list[Tensor], **kwargs: Any) -> list[torch.optim.Optimizer]:
    return [
        LookaheadSGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, inner_state="reset", **kwargs),
        LookaheadSGD(params, lr=0.05, momentum=0.9, dampening=0.2, inner_state="pullback", **kwargs),
        LookaheadAdam(params, lr=0.01, weight_decay=0.1, amsgrad=True, adaptive_alpha=True, **kwargs),
        LookaheadAdamW(params, lr=0.01, maximize=True, inner_state="pullback", adaptive_alpha=True, **kwargs),
    ]


OPTIMIZER_IDS = ["sgd-nesterov-reset", "sgd-dampening-pullback", "adam-amsgrad-adaptive", "adamw-pullback-adaptive"]


def _grads(params: list[Tensor], seed: int, *, skip: int | None = None, inf: bool = False) -> list[Tensor | None]:
    """Random gradients; parameter `skip` gets none; with inf, every gradient holds inf, -inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    grads: list[Tensor | None] = []
    for i, p in enumerate(params):
        g = None if i == skip else torch.randn(p.shape, generator=gen).to(p.dtype)
        if g is not None and inf:
            g.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])[: g.numel()]
        grads.append(g)
    return grads


def _step(
    opt: torch.optim.Optimizer,
    params: list[Tensor],
    grads: list[Tensor | None],
    scaler: tuple[Tensor, Tensor] | None = None,
) -> None:
    """One step with these gradients and, when given, GradScaler's (grad_scale, found_inf)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    if scaler is not None:
        opt.grad_scale, opt.found_inf = scaler
    opt.step()
    if scaler is not None:
        del opt.grad_scale, opt.found_inf


def _scaler(found_inf: float, scale: float = 1024.0) -> tuple[Tensor, Tensor]:
    return torch.tensor(scale), torch.tensor(found_inf)


# (b) The device path never syncs; the mode does catch a sync.
def test_no_host_sync_catches_item() -> None:
    x = torch.ones(2)
    with no_host_sync(), pytest.raises(HostSyncError):
        x.sum().item()
    with no_host_sync(), pytest.raises(HostSyncError):
        torch.tensor([1.0])
    assert x.sum().item() == 2.0  # and outside the `with` nothing is intercepted


@pytest.mark.parametrize("capturable", [False, True], ids=["found_inf", "capturable"])
@pytest.mark.parametrize("index", range(4), ids=OPTIMIZER_IDS)
def test_device_path_does_not_sync(index: int, capturable: bool) -> None:
    params = make_params(torch.float32, "cpu")
    opt = _optimizers(params, k=2, backend="foreach", capturable=capturable)[index]
    before = [p.detach().clone() for p in params]
    # Five steps: two syncs, a parameter without gradient, one skipped step; capturable=True
    # without GradScaler on the first two.
    grads = [_grads(params, n, skip=1 if n == 1 else None, inf=n == 3) for n in range(5)]
    scalers = [None if capturable and n < 2 else _scaler(float(n == 3)) for n in range(5)]
    with no_host_sync():
        for g, scaler in zip(grads, scalers, strict=True):
            _step(opt, params, g, scaler)
    assert all(not torch.equal(p, q) for p, q in zip(params, before, strict=True) if p.numel())
    assert opt.state[params[0]]["lookahead_step"].item() == 4  # the skipped step did not count


@pytest.mark.parametrize("index", range(4), ids=OPTIMIZER_IDS)
def test_host_path_reads_the_counters_once(index: int) -> None:
    params = make_params(torch.float32, "cpu")
    opt = _optimizers(params, k=2, backend="foreach")[index]
    grads = [_grads(params, n, skip=1 if n == 1 else None) for n in range(5)]
    with no_host_sync(), pytest.raises(HostSyncError):
        _step(opt, params, grads[0])  # the host does not know the counters yet
    _step(opt, params, grads[0])
    with no_host_sync():  # now it does: plain and sync steps, no read-back
        for g in grads[1:]:
            _step(opt, params, g)
    assert opt.state[params[0]]["lookahead_step"].item() == 5


class _StorageRecorder(TorchFunctionMode):
    """Records the storage of every tensor handed to a torch function."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, Tensor):
                self.storages.add(leaf.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


# (c) Plain host-path steps neither read nor write the slow weights.
@pytest.mark.parametrize("index", range(4), ids=OPTIMIZER_IDS)
def test_plain_host_steps_leave_slow_weights_alone(index: int) -> None:
    params = make_params(torch.bfloat16, "cpu")
    opt = _optimizers(params, k=3, backend="foreach")[index]
    _step(opt, params, _grads(params, 0))  # creates the state, φ ← θ
    slow = opt.state[params[0]]["slow_weights"]
    for n in range(1, 7):
        before = slow.clone()
        with _StorageRecorder() as recorder:
            _step(opt, params, _grads(params, n, skip=1 if n == 1 else None))
        touched = slow.untyped_storage().data_ptr() in recorder.storages
        is_sync = (n + 1) % 3 == 0
        assert touched == is_sync, f"step {n + 1}: slow weights {'not ' if is_sync else ''}passed to torch"
        assert torch.equal(slow, before) != is_sync, f"step {n + 1}"


# (d) found_inf: an inf/NaN gradient changes nothing at all, on a fresh optimizer, mid-cycle,
# and right after a sync (where the unchanged counter is a multiple of k).
def _bits(t: Tensor) -> Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().clone().view(ints[t.element_size()])


def _snapshot(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor]:
    return [_bits(p) for p in params] + [_bits(v) for p in params for v in opt.state[p].values()]


@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", range(4), ids=OPTIMIZER_IDS)
def test_found_inf_changes_nothing(index: int, dtype: torch.dtype, capturable: bool) -> None:
    params = make_params(dtype, "cpu")
    opt = _optimizers(params, k=3, backend="foreach", capturable=capturable)[index]
    fresh = [p.detach().clone() for p in params]
    _step(opt, params, _grads(params, 100, skip=2, inf=True), _scaler(1.0))
    for p, q in zip(params, fresh, strict=True):  # a skipped first step: parameters and fresh state as before it
        assert torch.equal(_bits(p), _bits(q))
        state = opt.state[p]
        assert torch.equal(_bits(state["slow_weights"].to(dtype)), _bits(q))
        assert all(not v.any() for key, v in state.items() if key != "slow_weights")
    for n in range(1, 4):
        _step(opt, params, _grads(params, n), _scaler(0.0))
        if n in (1, 3):  # mid-cycle, and right after the sync of step 3
            snapshot = _snapshot(opt, params)
            _step(opt, params, _grads(params, 100 + n, skip=2, inf=True), _scaler(1.0))
            for i, (a, b) in enumerate(zip(snapshot, _snapshot(opt, params), strict=True)):
                assert torch.equal(a, b), f"tensor {i} changed by a skipped step after {n} steps"
    assert opt.state[params[0]]["lookahead_step"].item() == 3


def _pairs(
    opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer, pa: list[Tensor], pb: list[Tensor]
) -> Iterator[tuple[str, Tensor, Tensor]]:
    for i, (p, q) in enumerate(zip(pa, pb, strict=True)):
        yield f"param {i}", p, q
        for key, value in opt_a.state[p].items():
            yield f"param {i} {key}", value, opt_b.state[q][key]


@pytest.mark.parametrize("index", range(4), ids=OPTIMIZER_IDS)
def test_host_and_device_steps_interleave(index: int) -> None:
    """The host's copies of the counters stay right when device-path steps (GradScaler) and
    host-path steps alternate: compared with the eager backend step for step."""
    params = make_params(torch.float32, "cpu")
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = _optimizers(params, k=2, backend="foreach")[index]
    ref = _optimizers(ref_params, k=2, backend="eager")[index]
    for n, found_inf in enumerate([None, None, 0.0, None, 1.0, None, None, 0.0, 0.0, None]):
        grads = _grads(params, n, skip=1 if n % 3 == 1 else None, inf=found_inf == 1.0)
        scaler = None if found_inf is None else _scaler(found_inf, scale=1.0)
        _step(opt, params, grads, scaler)
        _step(ref, ref_params, [None if g is None else g.clone() for g in grads], scaler)
        for what, got, want in _pairs(opt, ref, params, ref_params):
            torch.testing.assert_close(
                got, want, atol=1e-6, rtol=1e-5, msg=lambda m, where=f"step {n + 1} {what}": f"{where}: {m}"
            )
