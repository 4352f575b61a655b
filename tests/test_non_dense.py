"""Parameters with gaps between their elements (a view such as `torch.randn(10, 5, 2)[..., 0]`
made a leaf): torch.optim steps them, and so does every backend. The compiled backends walk
a parameter and its state linearly in memory, so a group holding one is routed to the
backend's fallback (cpu -> eager; cuda, cuda_emulated, triton -> foreach), which must step
it, and the contiguous state views the bucket gives it (`view_like`), exactly as the
reference does. The routing follows layout changes (`.data` replaced) both ways, and is
recorded as `Bucket.stepped_by`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadSGD, reference
from lookahead_fused.testing import TOLERANCES, Report, compare_step, reference_states

# The fallback of each compiled backend; eager and foreach step everything themselves.
FALLBACK = {"cpu": "eager", "cuda": "foreach", "cuda_emulated": "foreach", "triton": "foreach"}

K, ALPHA = 2, 0.7  # a sync every other step; α other than 0.5, so φ and θ weigh differently
GAPPED_REASON = r"parameter 0 of shape \(10, 5\) is not dense \(strides \(10, 2\)\)"

VARIANTS = {
    "adam": (LookaheadAdam, dict(lr=0.01)),
    "adam_reset": (LookaheadAdam, dict(lr=0.01, weight_decay=0.01, inner_state="reset")),
    "sgd_momentum": (LookaheadSGD, dict(lr=0.05, momentum=0.9)),
    "sgd_momentum_pullback": (LookaheadSGD, dict(lr=0.05, momentum=0.9, nesterov=True, inner_state="pullback")),
}
KIND = {LookaheadAdam: "adam", LookaheadSGD: "sgd"}


def _assert_ok(report: Report) -> None:
    assert report.ok, "\n".join(report.failures)


def _gapped(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor of `shape` with a gap after every element: every other element of a buffer."""
    return torch.randn(*shape, 2, generator=gen).to(dtype)[..., 0]


def _model(dtype: torch.dtype, seed: int) -> list[Tensor]:
    """The gapped (10, 5) view first, then a gapped vector and parameters the kernels take
    (contiguous, transposed, channels-last, 0-dim)."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        _gapped((10, 5), gen, dtype),  # strides (10, 2)
        torch.randn(40, generator=gen).to(dtype)[::2],  # strides (2,)
        torch.randn(7, 5, generator=gen).to(dtype),
        torch.randn(6, 4, generator=gen).to(dtype).t(),  # dense, not contiguous
        torch.randn(3, 4, 3, 3, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last),
        torch.randn((), generator=gen).to(dtype),
    ]
    assert params[0].stride() == (10, 2) and params[1].stride() == (2,)
    return [p.requires_grad_() for p in params]


def _grads(params: list[Tensor], gen: torch.Generator, step: int) -> list[Tensor | None]:
    """Random gradients; the gapped vector has none on every third step (no inner update,
    synced all the same)."""
    out: list[Tensor | None] = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        out.append(None if (i == 1 and step % 3 == 1) else g)
    return out


class _Reference:
    """The reference over copies of the optimizer's parameters, one group."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[Tensor]) -> None:
        self.kind = KIND[type(opt)]
        self.hyper = {key: v for key, v in opt.param_groups[0].items() if key != "params"}
        self.params = [p.detach().clone() for p in params]
        self.states = reference_states(self.kind, self.params, self.hyper)

    def step(self, grads: list[Tensor | None]) -> None:
        reference.step_group(self.kind, self.params, grads, self.states, self.hyper)


def _set_grads(params: list[Tensor], grads: list[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def _buckets(opt: torch.optim.Optimizer, group: int = 0) -> list[Any]:
    return opt._group_buckets[group]  # type: ignore[attr-defined]


def _assert_routed(backend: str, opt: torch.optim.Optimizer, reason: str | None, group: int = 0) -> None:
    """Every bucket of the group was stepped by the backend's fallback for `reason` (a regex),
    or (reason None) by the backend's own kernels."""
    for b in _buckets(opt, group):
        if backend not in FALLBACK:  # eager, foreach: no routing of their own
            assert b.stepped_by in (None, (backend, None))
        elif reason is None:
            assert b.stepped_by == (backend, None)
        else:
            name, why = b.stepped_by
            assert name == FALLBACK[backend]
            assert why is not None
            assert re.search(reason, why), why


# ---------------------------------------------------------------------------------------
# Against the reference and torch.optim.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gapped_view_matches_the_reference(backend: str, variant: str, dtype: torch.dtype) -> None:
    cls, kwargs = VARIANTS[variant]
    params = _model(dtype, seed=1)
    opt = cls(params, k=K, alpha=ALPHA, backend=backend, **kwargs)
    ref = _Reference(opt, params)
    gen = torch.Generator().manual_seed(2)
    report = Report()
    for step in range(5):  # syncs after steps 2 and 4
        grads = _grads(params, gen, step)
        _set_grads(params, grads)
        opt.step()
        ref.step(grads)
        compare_step(report, step + 1, opt, params, ref.params, ref.states)
        _assert_routed(backend, opt, GAPPED_REASON)
    _assert_ok(report)
    assert params[0].stride() == (10, 2) and params[1].stride() == (2,)  # stepped in place
    # The state of a gapped parameter is a contiguous view of the bucket's flat buffers.
    for key, value in opt.state[params[0]].items():
        if key not in ("step", "lookahead_step"):
            assert value.shape == params[0].shape and value.is_contiguous(), key


def test_gapped_view_with_grad_scaler_matches_the_reference(backend: str) -> None:
    """GradScaler's grad_scale / found_inf: the fallbacks' device path (foreach) on gapped
    parameters, a step with found_inf set changing nothing."""
    params = _model(torch.float32, seed=3)
    opt = LookaheadAdam(params, lr=0.01, k=K, alpha=ALPHA, backend=backend)
    ref = _Reference(opt, params)
    gen = torch.Generator().manual_seed(4)
    report = Report()
    for step in range(5):
        grads = _grads(params, gen, step)
        scale = torch.tensor(256.0)
        found_inf = torch.tensor(1.0 if step == 2 else 0.0)
        scaled = [None if g is None else g * scale for g in grads]
        if step == 2:
            scaled[0].view(-1)[3] = float("inf")  # type: ignore[union-attr]
        _set_grads(params, scaled)
        opt.grad_scale, opt.found_inf = scale, found_inf  # type: ignore[attr-defined]
        opt.step()
        reference.step_group(ref.kind, ref.params, scaled, ref.states, ref.hyper, grad_scale=scale, found_inf=found_inf)
        compare_step(report, step + 1, opt, params, ref.params, ref.states)
    _assert_ok(report)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_gapped_view_at_alpha_1_matches_torch_optim(backend: str, kind: str) -> None:
    """With α = 1 the sync moves nothing (φ ← θ, θ ← φ): Lookahead is its inner optimizer,
    and torch.optim steps the same gapped parameters, with gradients from a backward pass."""
    params = _model(torch.float32, seed=5)
    theirs = [p.detach().clone().requires_grad_() for p in params]
    theirs[0] = _gapped((10, 5), torch.Generator()).copy_(params[0].detach()).requires_grad_()
    if kind == "adam":
        opt: torch.optim.Optimizer = LookaheadAdam(params, lr=0.01, k=K, alpha=1.0, backend=backend)
        torch_opt: torch.optim.Optimizer = torch.optim.Adam(theirs, lr=0.01)
    else:
        opt = LookaheadSGD(params, lr=0.05, momentum=0.9, k=K, alpha=1.0, backend=backend)
        torch_opt = torch.optim.SGD(theirs, lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        inputs = [torch.randn(p.shape, generator=gen) for p in params]
        for ps, o in ((params, opt), (theirs, torch_opt)):
            o.zero_grad()
            sum(((p * x).sum() + (p * p).sum() * 0.1) for p, x in zip(ps, inputs)).backward()
            o.step()
        for i, (p, q) in enumerate(zip(params, theirs)):
            torch.testing.assert_close(p, q, **TOLERANCES[torch.float32], msg=f"step {step + 1} param {i}")
    assert params[0].stride() == (10, 2)
    _assert_routed(backend, opt, GAPPED_REASON)


# ---------------------------------------------------------------------------------------
# Layout changes: routing follows `.data` both ways.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["adam", "sgd_momentum"])
def test_parameter_made_non_dense_routes_and_made_dense_returns(backend: str, variant: str) -> None:
    cls, kwargs = VARIANTS[variant]
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(10, 5, generator=gen).requires_grad_(), torch.randn(33, generator=gen).requires_grad_()]
    opt = cls(params, k=K, alpha=ALPHA, backend=backend, **kwargs)
    ref = _Reference(opt, params)
    report = Report()
    moment = "exp_avg" if variant == "adam" else "momentum_buffer"
    view = None
    for step in range(9):
        if step == 3:  # new values in a gapped layout, as `p.data = torch.randn(10, 5, 2)[..., 0]`
            new = _gapped((10, 5), gen)
            params[0].data = new
            ref.params[0].copy_(new)
        elif step == 6:  # dense again (the values kept)
            params[0].data = params[0].detach().clone(memory_format=torch.contiguous_format)
        grads = _grads(params, gen, step)
        _set_grads(params, grads)
        opt.step()
        ref.step(grads)
        compare_step(report, step + 1, opt, params, ref.params, ref.states)
        dense = not 3 <= step < 6
        _assert_routed(backend, opt, None if dense else GAPPED_REASON)
        if view is None:
            view = opt.state[params[0]][moment]
        assert opt.state[params[0]][moment] is view  # optimizer.state[p] stays valid through the changes
        assert view.is_contiguous()  # beside a contiguous (10, 5) parameter, or behind a gapped one
    _assert_ok(report)


def test_transposed_to_gapped_keeps_state_beside_the_parameter(backend: str) -> None:
    """A dense but transposed parameter (state strided like it) made gapped (state made
    contiguous) and transposed again (state strided like it again), values kept throughout."""
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(4, 6, generator=gen).t().requires_grad_()
    opt = LookaheadAdam([p], lr=0.01, k=K, alpha=ALPHA, backend=backend)
    ref = _Reference(opt, [p])
    report = Report()
    for step in range(7):
        if step == 2:
            new = torch.randn(6, 4, 2, generator=gen)[..., 0]
            p.data = new
            ref.params[0].copy_(new)
        elif step == 4:
            p.data = p.detach().t().contiguous().t()
        grads = _grads([p], gen, step)
        _set_grads([p], grads)
        opt.step()
        ref.step(grads)
        compare_step(report, step + 1, opt, [p], ref.params, ref.states)
        gapped = 2 <= step < 4
        want = (1, 6) if not gapped else (4, 1)
        assert opt.state[p]["exp_avg"].stride() == want
        _assert_routed(backend, opt, r"parameter 0 of shape \(6, 4\) is not dense" if gapped else None)
    _assert_ok(report)


# ---------------------------------------------------------------------------------------
# The recorded routing.
# ---------------------------------------------------------------------------------------


def test_routing_reason_is_recorded_per_group(backend: str) -> None:
    """A group with a gapped parameter goes to the fallback; a dense group of the same
    optimizer stays on the kernels."""
    gen = torch.Generator().manual_seed(9)
    gapped = _gapped((10, 5), gen).requires_grad_()
    dense = [torch.randn(7, 5, generator=gen).requires_grad_(), torch.randn(3, generator=gen).requires_grad_()]
    opt = LookaheadSGD([{"params": [gapped, dense[0]]}, {"params": [dense[1]]}], lr=0.1, momentum=0.9, backend=backend)
    for p in (gapped, *dense):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    _assert_routed(backend, opt, GAPPED_REASON, group=0)
    _assert_routed(backend, opt, None, group=1)


def test_routing_reason_names_the_other_bucket(backend: str) -> None:
    """One counter per group: a dense fp32 bucket whose group also holds a gapped bf16
    parameter goes to the fallback with it, and its reason says why."""
    gen = torch.Generator().manual_seed(10)
    dense = torch.randn(7, 5, generator=gen).requires_grad_()
    gapped = _gapped((10, 5), gen, torch.bfloat16).requires_grad_()
    opt = LookaheadAdam([dense, gapped], lr=0.01, k=K, alpha=ALPHA, backend=backend)
    ref = _Reference(opt, [dense, gapped])
    report = Report()
    for step in range(3):
        grads = _grads([dense, gapped], gen, step + 5)
        _set_grads([dense, gapped], grads)
        opt.step()
        ref.step(grads)
        compare_step(report, step + 1, opt, [dense, gapped], ref.params, ref.states)
    _assert_ok(report)
    by_dtype = {b.dtype: b for b in _buckets(opt)}
    if backend in FALLBACK:
        fallback = FALLBACK[backend]
        assert by_dtype[torch.bfloat16].stepped_by[0] == fallback
        assert "is not dense" in by_dtype[torch.bfloat16].stepped_by[1]
        name, why = by_dtype[torch.float32].stepped_by
        assert name == fallback
        assert why.startswith(f"its group also holds a bucket the {backend} kernels cannot step: ")
        assert "is not dense" in why


def test_unsupported_dtype_reason_is_recorded(backend: str) -> None:
    """The dtype fallback the kernels already had records its reason the same way."""
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = LookaheadAdam([p], lr=0.01, backend=backend)
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step()
    (b,) = _buckets(opt)
    if backend in FALLBACK:
        assert b.stepped_by[0] == FALLBACK[backend]
        assert "do not cover torch.float64" in b.stepped_by[1]


def test_layout_worked_out_once_per_layout(backend: str) -> None:
    """A steady step does not look at the parameters' layout again; replacing `.data` does."""
    gen = torch.Generator().manual_seed(11)
    params = [_gapped((10, 5), gen).requires_grad_(), torch.randn(6, generator=gen).requires_grad_()]
    opt = LookaheadAdam(params, lr=0.01, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    (b,) = _buckets(opt)
    if backend not in FALLBACK:
        return  # eager and foreach do not ask
    worked_out = b._layout_problem
    assert worked_out is not None and worked_out[1] is not None
    for _ in range(3):
        opt.step()
        assert b._layout_problem is worked_out
    params[0].data = params[0].detach().contiguous()
    opt.step()
    assert b._layout_problem is not worked_out and b._layout_problem[1] is None
    assert b.stepped_by == (backend, None)


# ---------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["adam", "sgd_momentum"])
def test_state_dict_round_trip_with_gapped_parameters(backend: str, variant: str) -> None:
    cls, kwargs = VARIANTS[variant]
    params = _model(torch.float32, seed=12)
    opt = cls(params, k=3, alpha=ALPHA, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(13)
    for step in range(4):  # the cycle is mid-way (count 4, k 3) when saved
        _set_grads(params, _grads(params, gen, step))
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for i, p in enumerate(params):
        for key, value in saved["state"][i].items():
            if isinstance(value, Tensor) and key not in ("step", "lookahead_step"):
                assert value.shape == p.shape, (i, key)

    clones = [p.detach().clone() for p in params]
    clones[0] = _gapped((10, 5), torch.Generator()).copy_(params[0].detach())
    clones[1] = torch.zeros(40)[::2].copy_(params[1].detach())
    clones = [c.requires_grad_() for c in clones]
    loaded = cls(clones, k=3, alpha=ALPHA, backend=backend, **kwargs)
    loaded.load_state_dict(saved)
    for step in range(4, 8):
        grads = _grads(params, gen, step)
        _set_grads(params, grads)
        _set_grads(clones, grads)
        opt.step()
        loaded.step()
        for i, (p, c) in enumerate(zip(params, clones)):
            assert torch.equal(p, c), f"step {step + 1} param {i}"
            for key, value in opt.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded.state[c][key])), (step, i, key)
    assert clones[0].stride() == (10, 2)
    _assert_routed(backend, loaded, GAPPED_REASON)


def test_torch_optim_checkpoint_with_gapped_parameters(backend: str) -> None:
    """torch.optim.Adam's state of a gapped parameter (contiguous moments) loads, and with
    α = 1 training goes on as torch.optim's would."""
    gen = torch.Generator().manual_seed(14)
    ours = [_gapped((10, 5), gen).requires_grad_(), torch.randn(8, generator=gen).requires_grad_()]
    theirs = [_gapped((10, 5), torch.Generator()).copy_(ours[0].detach()), ours[1].detach().clone()]
    theirs = [t.requires_grad_() for t in theirs]
    torch_opt = torch.optim.Adam(theirs, lr=0.01)

    def grads(step: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(p.shape, generator=g) for p in ours]

    for step in range(3):
        _set_grads(theirs, grads(step))  # type: ignore[arg-type]
        torch_opt.step()
    for o, t in zip(ours, theirs):
        o.data.copy_(t.detach())
    opt = LookaheadAdam(ours, lr=0.01, k=K, alpha=1.0, backend=backend)
    opt.load_state_dict(torch_opt.state_dict())
    for step in range(3, 7):
        _set_grads(theirs, grads(step))  # type: ignore[arg-type]
        _set_grads(ours, grads(step))  # type: ignore[arg-type]
        torch_opt.step()
        opt.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p, q, **TOLERANCES[torch.float32], msg=f"step {step + 1} param {i}")
    _assert_routed(backend, opt, GAPPED_REASON)
