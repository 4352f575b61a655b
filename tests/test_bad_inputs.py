"""Bad inputs and faults, on every backend: each gets a clear Python exception (at
construction, at load, or at step before anything changes), or is legitimately accepted and
then behaves like the specification (`lookahead_fused.reference`) or torch.optim.

The cases already covered elsewhere are listed in README's bad-input table with their tests
(tests/test_validation.py, tests/test_state.py, tests/test_amp.py, tests/test_cpu_backend.py);
this file covers the rest. "Before anything changes" is checked by comparing copies of every
parameter and state tensor (`test_state.snapshot`) taken before the rejected call.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends, reference
from lookahead_fused._buckets import Bucket
from lookahead_fused.testing import TOLERANCES

from .conftest import usable_backends
from .test_state import assert_bitwise_equal, snapshot

CLASSES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "sgd": (LookaheadSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adam": (LookaheadAdam, torch.optim.Adam, dict(lr=0.01)),
    "adamw": (LookaheadAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
}
kinds = pytest.mark.parametrize("kind", list(CLASSES))
META = torch.device("meta")  # the only second device a CPU-only machine has


def _make(kind: str, params: Any, backend: str, **options: Any) -> torch.optim.Optimizer:
    cls, _, hyper = CLASSES[kind]
    return cls(params, backend=backend, **{**hyper, **options})


def _grads(params: Sequence[Tensor], step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


class _Reference:
    """The specification stepped beside an optimizer: the same gradients on clones of the
    parameters, with the group's hyperparameters."""

    def __init__(self, kind: str, opt: torch.optim.Optimizer, group: int = 0) -> None:
        self.kind = kind
        self.hyper = {key: v for key, v in opt.param_groups[group].items() if key != "params"}
        self.params = [p.detach().clone() for p in opt.param_groups[group]["params"]]
        self.states = [self._fresh(p) for p in self.params]

    def _fresh(self, p: Tensor) -> dict[str, Any]:
        h = self.hyper
        return reference.init_state(
            p, optimizer=self.kind, momentum=h.get("momentum", 0.0), amsgrad=h.get("amsgrad", False),
            inner_state=h["inner_state"], state_dtype=h["state_dtype"], slow_dtype=h["slow_dtype"],
        )  # fmt: skip

    def step(self, grads: Sequence[Tensor | None]) -> None:
        grads = [None if g is None else g.to(p.dtype) for p, g in zip(self.params, grads, strict=True)]
        reference.step_group(self.kind, self.params, grads, self.states, self.hyper)

    def assert_matches(self, opt: torch.optim.Optimizer, params: Sequence[Tensor], equal_nan: bool = False) -> None:
        for i, (p, want, state) in enumerate(zip(params, self.params, self.states, strict=True)):
            tol = TOLERANCES[p.dtype]
            torch.testing.assert_close(
                p.detach(), want, **tol, equal_nan=equal_nan, msg=lambda m, i=i: f"param {i}: {m}"
            )
            for key, value in state.items():
                got = opt.state[p][key]
                torch.testing.assert_close(
                    got, value, **tol, equal_nan=equal_nan, msg=lambda m, i=i, key=key: f"param {i} {key}: {m}"
                )


def _step(opt: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()


def _groups_settings(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{key: v for key, v in g.items() if key != "params"} for g in opt.param_groups]


# ---------------------------------------------------------------------------------------
# Hyperparameters.
# ---------------------------------------------------------------------------------------

_NAN_OR_TENSOR = {
    "sgd": [dict(lr=math.nan), dict(momentum=math.nan), dict(weight_decay=math.nan), dict(dampening=math.nan),
            dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(-0.1))],
    "adam": [dict(lr=math.nan), dict(eps=math.nan), dict(betas=(math.nan, 0.9)), dict(betas=(0.9, math.nan)),
             dict(weight_decay=math.nan), dict(alpha_low=math.nan, adaptive_alpha=True),
             dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(-0.1))],
}  # fmt: skip
_NAN_OR_TENSOR["adamw"] = _NAN_OR_TENSOR["adam"]

_MESSAGES = {  # what is expected where torch.optim has no such check to borrow its text from
    "lr": r"Invalid learning rate: (nan|-0\.1)|Tensor lr must be 1-element",
    "momentum": "Invalid momentum value: nan",
    "weight_decay": "Invalid weight_decay value: nan",
    "dampening": "Invalid dampening value: nan",
    "eps": "Invalid epsilon value: nan",
    "betas": r"Invalid beta parameter at index \d: nan",
    "alpha_low": "Invalid alpha_low: nan",
}


@pytest.mark.parametrize(
    "kind, kwargs",
    [(kind, kw) for kind, cases in _NAN_OR_TENSOR.items() for kw in cases],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_nan_and_bad_tensor_hyperparameters_rejected(backend: str, kind: str, kwargs: dict[str, Any]) -> None:
    """NaN fails every `0 <= x` check (torch.optim.SGD lets NaN through; we do not), and a
    tensor lr must hold one non-negative value. The message names the hyperparameter."""
    with pytest.raises(ValueError, match=_MESSAGES[next(iter(kwargs))]):
        _make(kind, [torch.zeros(3, requires_grad=True)], backend, **kwargs)


# ---------------------------------------------------------------------------------------
# Parameters and gradients of the wrong kind.
# ---------------------------------------------------------------------------------------


def test_sparse_parameter_rejected(backend: str) -> None:
    """A sparse parameter has no dense storage for flat state beside it: refused when it is
    given, at construction or by add_param_group (which then adds nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about sparse invariant checks
        sparse = nn.Parameter(torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (3,)))
    with pytest.raises(ValueError, match="LookaheadSGD supports dense parameters only, got layout torch.sparse_coo"):
        LookaheadSGD([sparse], lr=0.1, backend=backend)
    p = torch.ones(3, requires_grad=True)
    opt = LookaheadSGD([p], lr=0.1, k=1, backend=backend)
    with pytest.raises(ValueError, match="dense parameters only"):
        opt.add_param_group({"params": [sparse]})
    assert len(opt.param_groups) == 1
    _step(opt, [p], [torch.ones(3)])
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))  # φ + α(θ − φ) with θ = 0.9


@pytest.mark.parametrize("bad_dtype", [torch.complex64, torch.float32], ids=["complex", "fp32-for-bf16"])
@kinds
def test_gradient_of_another_dtype_rejected_before_any_change(backend: str, kind: str, bad_dtype: torch.dtype) -> None:
    """A complex gradient for a real parameter (set through `.grad.data`, which autograd's
    check does not see), or an fp32 gradient for a bf16 parameter (allowed by autograd once
    `grad_dtype` is lifted): refused at step, after the first valid step, nothing changed."""
    dtype = torch.bfloat16 if bad_dtype == torch.float32 else torch.float32
    params = [torch.randn(4, 3).to(dtype).requires_grad_(), torch.randn(5).to(dtype).requires_grad_()]
    opt = _make(kind, params, backend, k=2)
    _step(opt, params, _grads(params, 0))
    before = snapshot(opt)
    params[1].grad = torch.ones_like(params[1])
    if bad_dtype.is_complex:
        params[1].grad.data = torch.ones(5, dtype=bad_dtype)
    else:
        params[1].grad_dtype = None
        params[1].grad = torch.ones(5, dtype=bad_dtype)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(RuntimeError, match=f"gradient of dtype {bad_dtype} for a parameter of dtype {dtype}"):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


@kinds
def test_mixed_dtypes_in_one_group_match_the_reference(backend: str, kind: str) -> None:
    """fp32, bf16 and fp16 parameters in one group: one bucket per dtype, one lookahead counter
    for the group, every parameter as the reference steps it (in its own dtype's tolerance)."""
    gen = torch.Generator().manual_seed(0)
    shapes_dtypes = [((5, 4), torch.float32), ((7,), torch.bfloat16), ((3, 3), torch.float16), ((2,), torch.float32)]
    params = [torch.randn(s, generator=gen).to(d).requires_grad_() for s, d in shapes_dtypes]
    opt = _make(kind, params, backend, k=2)
    ref = _Reference(kind, opt)
    for step in range(5):
        grads = _grads(params, step)
        _step(opt, params, grads)
        ref.step(grads)
    ref.assert_matches(opt, params)
    assert {p.dtype for p in params} == {b.dtype for b in opt._buckets(0)}
    assert all(int(opt.state[p]["lookahead_step"]) == 5 for p in params)


def test_mixed_devices_need_a_backend_that_runs_on_each(backend: str) -> None:
    """A group may span devices (one bucket per device) if the backend runs on each of them;
    otherwise the constructor, or add_param_group, names the device and why, and a refused
    group is not kept. On a CPU-only machine "meta" stands in for the second device: the
    device-agnostic backends accept it, the others refuse it."""
    p, q = torch.randn(3, requires_grad=True), torch.randn(4, device=META, requires_grad=True)
    why = backends.unavailable(backend, META)
    if why is None:
        opt = LookaheadSGD([p, q], lr=0.1, backend=backend)
        assert sorted(str(b.device) for b in opt._buckets(0)) == ["cpu", "meta"]
        return
    message = re.escape(f"backend '{backend}' cannot run on meta: {why}")
    with pytest.raises(RuntimeError, match=message):
        LookaheadSGD([p, q], lr=0.1, backend=backend)
    opt = LookaheadSGD([p], lr=0.1, k=2, backend=backend)
    _step(opt, [p], [torch.ones(3)])
    before, settings = snapshot(opt), _groups_settings(opt)
    with pytest.raises(RuntimeError, match=message):
        opt.add_param_group({"params": [q]})
    assert _groups_settings(opt) == settings
    assert_bitwise_equal(snapshot(opt), before)
    _step(opt, [p], [torch.ones(3)])  # still steps: the refused group did not stay behind
    assert int(opt.state[p]["lookahead_step"]) == 2


def test_auto_backend_for_mixed_devices_is_one_that_runs_on_all() -> None:
    p, q = torch.randn(3, requires_grad=True), torch.randn(4, device=META, requires_grad=True)
    chosen = LookaheadSGD([p, q], lr=0.1).backend
    assert backends.unavailable(chosen, META) is None and backends.unavailable(chosen, torch.device("cpu")) is None


# ---------------------------------------------------------------------------------------
# Parameters changed behind the optimizer.
# ---------------------------------------------------------------------------------------


@kinds
def test_data_replaced_with_same_shape_is_followed(backend: str, kind: str) -> None:
    """`p.data = new tensor` (a re-initialisation, a checkpoint loaded into the model): the next
    step updates the new storage and keeps the state, exactly as the reference does."""
    params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(7))]
    opt = _make(kind, params, backend, k=2)
    ref = _Reference(kind, opt)
    for step in range(6):
        if step == 3:
            old = params[0].data
            params[0].data = torch.full((6, 5), 0.5)
            ref.params[0].fill_(0.5)
        grads = _grads(params, step)
        _step(opt, params, grads)
        ref.step(grads)
    ref.assert_matches(opt, params)
    assert not torch.equal(old, params[0].detach())  # the old storage is no longer written


def test_data_replaced_with_another_size_rejected_before_any_change(backend: str) -> None:
    p = nn.Parameter(torch.zeros(10))
    opt = LookaheadSGD([p], lr=0.1, momentum=0.9, k=3, backend=backend)
    _step(opt, [p], [torch.ones(10)])
    before = snapshot(opt)
    p.data = torch.zeros(12)
    p.grad = torch.ones(12)
    with pytest.raises(
        RuntimeError, match=re.escape("parameter 0 of shape (12,) has 12 elements, its optimizer state 10")
    ):
        opt.step()
    before["params"] = [torch.zeros(12)]  # the user's replacement, untouched by the failed step
    assert_bitwise_equal(snapshot(opt), before)


def _in_child(fn: Callable[[], str], timeout: float = 60.0) -> str:
    """Run fn in a forked child and return what it returned, or how the child died: a case
    that corrupts the heap must not take the test session down with it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, no atexit handlers
        os.close(read)
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork
            out = fn()
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            out = f"{type(e).__name__}: {e}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:  # a corrupted heap can also hang the child
            os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    status = done[1]
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return out


def test_storage_shrunk_behind_the_parameter_rejected(backend: str) -> None:
    """`p.untyped_storage().resize_(16)`: the parameter claims 1000 elements its storage no
    longer holds. A step must refuse it rather than read and write past the storage."""

    def case() -> str:
        p = torch.zeros(1000, requires_grad=True)
        opt = LookaheadSGD([p], lr=0.1, backend=backend)
        _step(opt, [p], [torch.ones(1000)])
        p.data.untyped_storage().resize_(16)
        try:
            opt.step()
        except RuntimeError as e:
            return f"RuntimeError: {e}"
        return "stepped"

    assert _in_child(case) == (
        "RuntimeError: the storage of parameter 0 of shape (1000,) is smaller than the parameter (was it resized?)"
    )


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_model_half_after_construction_keeps_state(backend: str, kind: str) -> None:
    """`model.half()` mid-training: the buckets are rebuilt for fp16 parameters, the state
    (moments, counters, slow weights) carries over in fp32, and the steps continue as the
    reference continues them with the same fp32 state beside fp16 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    params = list(model.parameters())
    opt = _make(kind, model.parameters(), backend, k=2)
    ref = _Reference(kind, opt)
    for step in range(6):
        if step == 3:
            model.half()
            ref.params = [p.half() for p in ref.params]
        grads = _grads(params, step)
        _step(opt, params, grads)
        ref.step(grads)
    assert all(p.dtype == torch.float16 for p in params)
    ref.assert_matches(opt, params)
    for p in params:
        assert opt.state[p]["slow_weights"].dtype == torch.float32
        assert int(opt.state[p]["step"]) == 6 and int(opt.state[p]["lookahead_step"]) == 6


# ---------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mismatch", ["shapes", "group_count", "group_size"])
def test_rejected_load_state_dict_changes_nothing(backend: str, mismatch: str) -> None:
    """A checkpoint of another model is refused by load_state_dict itself (not at the next
    step), and the optimizer keeps its own state, settings and ability to step."""
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    if mismatch == "shapes":
        source = [torch.randn(4, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
        message = re.escape("loaded state 'exp_avg' has 4 elements for a parameter of shape (3,)")
    elif mismatch == "group_count":
        source = [{"params": [torch.randn(3, requires_grad=True)]}, {"params": [torch.randn(2, 2, requires_grad=True)]}]
        message = "number of parameter groups"
    else:
        source = [torch.randn(3, requires_grad=True)]
        message = "parameter group that doesn't match the size"
    other = LookaheadAdam(source, lr=0.01, k=2, backend=backend)
    other_params = [p for g in other.param_groups for p in g["params"]]
    _step(other, other_params, _grads(other_params, 0))
    opt = LookaheadAdam([a, b], lr=0.02, k=3, backend=backend)
    _step(opt, [a, b], _grads([a, b], 1))
    before, settings = snapshot(opt), _groups_settings(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(other.state_dict())
    assert_bitwise_equal(snapshot(opt), before)
    assert _groups_settings(opt) == settings
    _step(opt, [a, b], _grads([a, b], 2))
    assert int(opt.state[a]["lookahead_step"]) == 2


# ---------------------------------------------------------------------------------------
# Non-finite gradients.
# ---------------------------------------------------------------------------------------


def _nonfinite_grads(params: Sequence[Tensor], step: int) -> list[Tensor]:
    grads = _grads(params, step)
    grads[0].view(-1)[3] = math.nan
    grads[0].view(-1)[7] = math.inf
    grads[1].view(-1)[0] = -math.inf
    return grads


# numpy, under the Triton interpreter, warns on arithmetic with Inf and NaN: the point here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@kinds
def test_nan_inf_gradients_without_grad_scaler_propagate_like_torch_optim(backend: str, kind: str) -> None:
    """Without GradScaler nothing checks the gradients, as in torch.optim: the inner steps put
    NaN/Inf exactly where torch.optim puts them (parameters and state), and the sync then
    carries them into the slow weights where the reference does."""
    cls, torch_cls, hyper = CLASSES[kind]
    params = [torch.randn(4, 5).requires_grad_(), torch.randn(6).requires_grad_()]
    torch_params = [p.detach().clone().requires_grad_() for p in params]
    k = 3
    opt = cls(params, k=k, backend=backend, **hyper)
    torch_opt = torch_cls(torch_params, **hyper)
    ref = _Reference(kind, opt)
    for step in range(k):
        grads = _nonfinite_grads(params, step)
        _step(opt, params, grads)
        ref.step(grads)
        if step < k - 1:  # inner steps only: θ and the inner state are torch.optim's
            _step(torch_opt, torch_params, grads)
            for p, q in zip(params, torch_params, strict=True):
                torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True)
                assert torch.equal(p.isnan(), q.isnan()) and torch.equal(p.isinf(), q.isinf())
                for key, value in torch_opt.state[q].items():
                    if key != "step":
                        torch.testing.assert_close(opt.state[p][key], value, equal_nan=True, msg=key)
    ref.assert_matches(opt, params, equal_nan=True)
    assert params[0].detach().isnan().any()  # the NaN did propagate: this is not a skipped step


@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
@kinds
def test_nan_gradient_with_grad_scaler_skips_the_step(backend: str, kind: str, capturable: bool) -> None:
    """A NaN in a scaled gradient (test_amp covers Inf): GradScaler's found_inf makes the step
    change nothing, bit for bit, counters included; the scale backs off and training goes on."""
    params = [torch.randn(4, 5).requires_grad_(), torch.randn(6).requires_grad_()]
    opt = _make(kind, params, backend, k=2, capturable=capturable)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_step(step: int, nan: bool = False) -> None:
        opt.zero_grad()
        grads = _grads(params, step)
        scaler.scale(sum((p * g).sum() for p, g in zip(params, grads, strict=True))).backward()
        if nan:
            params[0].grad.view(-1)[3] = math.nan
        scaler.step(opt)
        scaler.update()

    scaled_step(0)
    before = snapshot(opt)
    scaled_step(1, nan=True)  # would have been the sync step
    assert_bitwise_equal(snapshot(opt), before)
    assert scaler.get_scale() == 2.0**9
    scaled_step(2)
    assert int(opt.state[params[0]]["lookahead_step"]) == 2
    assert all(torch.equal(p.detach(), opt.state[p]["slow_weights"]) for p in params)  # it synced


# ---------------------------------------------------------------------------------------
# Groups.
# ---------------------------------------------------------------------------------------


@kinds
def test_empty_groups_are_harmless(backend: str, kind: str) -> None:
    """Groups without parameters, given at construction or added mid-training, change
    nothing: the result, the state_dict round trip and slow_weights() are those of the
    optimizer without them."""
    params = [torch.randn(4, 3).requires_grad_(), torch.randn(5).requires_grad_()]
    plain_params = [p.detach().clone().requires_grad_() for p in params]
    opt = _make(kind, [{"params": []}, {"params": params}], backend, k=2)
    plain = _make(kind, plain_params, backend, k=2)
    for step in range(5):
        if step == 2:
            opt.add_param_group({"params": []})
        grads = _grads(params, step)
        _step(opt, params, grads)
        _step(plain, plain_params, grads)
    assert len(opt.param_groups) == 3
    restored = _make(kind, [{"params": []}, {"params": params}, {"params": []}], backend, k=2)
    restored.load_state_dict(opt.state_dict())
    for o in (opt, restored):
        got, want = snapshot(o), snapshot(plain)
        assert_bitwise_equal(got, want)
    with opt.slow_weights(), plain.slow_weights():
        assert all(torch.equal(p, q) for p, q in zip(params, plain_params, strict=True))


@kinds
def test_add_param_group_mid_training(backend: str, kind: str) -> None:
    """A group added after 3 steps, with its own k and lr, starts its own cycle: it steps as a
    new optimizer over its parameters would, and the first group as if nothing was added."""
    first, added = [torch.randn(4, 3).requires_grad_()], [torch.randn(6).requires_grad_()]
    alone_first = [p.detach().clone().requires_grad_() for p in first]
    alone_added = [p.detach().clone().requires_grad_() for p in added]
    opt = _make(kind, first, backend, k=2)
    only_first = _make(kind, alone_first, backend, k=2)
    for step in range(7):
        if step == 3:
            opt.add_param_group({"params": added, "k": 3, "lr": 0.03})
            only_added = _make(kind, alone_added, backend, k=3, lr=0.03)
        grads = _grads(first + added, step)
        _step(opt, first + (added if step >= 3 else []), grads[: 1 + (step >= 3)])
        _step(only_first, alone_first, grads[:1])
        if step >= 3:
            _step(only_added, alone_added, grads[1:])
    got = snapshot(opt)
    assert_bitwise_equal(
        got, {"params": snapshot(only_first)["params"] + snapshot(only_added)["params"], "state": got["state"]}
    )
    for mine, alone in ((first[0], alone_first[0]), (added[0], alone_added[0])):
        for key, value in (only_first if mine is first[0] else only_added).state[alone].items():
            assert torch.equal(opt.state[mine][key], value), key
    assert int(opt.state[added[0]]["lookahead_step"]) == 4 and int(opt.state[first[0]]["lookahead_step"]) == 7


def test_group_setting_broken_after_construction_rejected_before_any_change(backend: str) -> None:
    p = torch.randn(5, requires_grad=True)
    opt = LookaheadSGD([p], lr=0.1, momentum=0.9, k=2, backend=backend)
    _step(opt, [p], [torch.ones(5)])
    before = snapshot(opt)
    opt.param_groups[0]["k"] = 0
    with pytest.raises(ValueError, match="Invalid k: 0"):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


def test_parameter_in_two_groups_rejected(backend: str) -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError) as want:
        torch.optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        LookaheadSGD([{"params": [p]}, {"params": [p]}], lr=0.1, backend=backend)


def test_non_leaf_parameter_rejected(backend: str) -> None:
    p = torch.zeros(3, requires_grad=True) * 2
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        LookaheadSGD([p], lr=0.1, backend=backend)


@kinds
def test_parameter_listed_twice_in_a_group_is_stepped_once(backend: str, kind: str) -> None:
    """torch.optim warns and would step a duplicate twice; tied weights are stepped once here,
    as the reference steps the parameter listed once."""
    p, q = torch.randn(5).requires_grad_(), torch.randn(3).requires_grad_()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = _make(kind, [p, q, p], backend, k=2)
    ref_opt = _make(kind, [p.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()], "eager", k=2)
    ref = _Reference(kind, ref_opt)
    for step in range(3):
        grads = _grads([p, q], step)
        p.grad, q.grad = grads
        opt.step()
        ref.step(grads)
    ref.assert_matches(opt, [p, q])


# ---------------------------------------------------------------------------------------
# Offsets of 2^31 and more.
# ---------------------------------------------------------------------------------------

_BIG = 2**31
_SENTINEL = 1234.5


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("backend_", [b for b in ("cpu", "cuda_emulated") if b in usable_backends()])
def test_state_offsets_beyond_2_31(backend_: str) -> None:
    """A parameter whose state starts past element 2^31 of its bucket's flat buffers: every
    offset and index must be 64-bit, a 32-bit one would wrap and write before the buffer.

    Heavy in address space only: the flat buffers (2^31 + 61 fp32 elements, 8 GiB each) and,
    for "cpu", a leading 2^31-element parameter are allocated with torch.empty and never
    written except near the end, so the kernel must not touch them either (the leading
    parameter has no gradient and the steps are plain, which skips it). The bucket is built by
    hand (build_buckets would zero-fill 8 GiB); the step is the backend's own. "cpu" needs the
    rows to tile the buffers from 0, hence the leading parameter; "cuda_emulated" walks chunks
    of the parameters only, so a gap before the parameter is enough and the sync is tested."""
    kind, n = "adam", 37
    dtype = torch.float32
    small = torch.randn(n, requires_grad=True)
    twin = small.detach().clone().requires_grad_()
    opt = LookaheadAdam([twin], lr=0.01, k=2, backend=backend_)  # the same step at offset 0
    group = opt.param_groups[0]
    rss = _rss_mib()
    if backend_ == "cpu":
        params, offsets, steps = [torch.empty(_BIG, dtype=dtype), small], [0, _BIG], 1
    else:
        params, offsets, steps = [small], [_BIG + 24], 2
    total = offsets[-1] + n
    tail = slice(offsets[-1], total)
    guard = slice(offsets[-1] - 16, offsets[-1])  # just before the parameter's state
    flat = {key: torch.empty(total, dtype=dtype) for key in ("exp_avg", "exp_avg_sq", "slow_weights")}
    for buf in flat.values():
        buf[tail].zero_()
        buf[guard].fill_(_SENTINEL)
    flat["slow_weights"][tail].copy_(small.detach())
    flat["step"] = torch.zeros(len(params))
    flat["lookahead_step"] = torch.zeros(len(params))
    bucket = Bucket(params, offsets, total, small.device, dtype, dtype, dtype, flat, [], host_count=0)
    step_group = backends.get(backend_).step
    for step in range(steps):
        small.grad = twin.grad = _grads([small], step)[0]
        # The front-end's gradient check: it bumps the version that makes the backend
        # rewrite the gradient addresses in its tables.
        step_group(kind, group, [bucket], [bucket.grads("LookaheadAdam")], None, None)
        opt.step()
    assert torch.equal(small.detach(), twin.detach())
    for key in ("exp_avg", "exp_avg_sq", "slow_weights"):
        assert torch.equal(flat[key][tail], opt.state[twin][key]), key
        assert torch.equal(flat[key][guard], torch.full((16,), _SENTINEL)), f"{key}: written before the parameter"
    assert flat["lookahead_step"][-1].item() == steps and flat["step"][-1].item() == steps
    assert _rss_mib() - rss < 512, "the test touched far more memory than the parameter's pages"
