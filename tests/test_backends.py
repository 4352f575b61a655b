"""Every backend against the eager reference: the variant matrix, dtypes and layouts.

The matrix itself lives in `lookahead_fused.testing` (shared with `python -m lookahead_fused
check`); the tests below add the cases it does not cover: tied, frozen and empty parameters,
state dtype overrides, channels-last layout and backend resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadSGD, backends, reference
from lookahead_fused.testing import TOLERANCES, Variant, run_against_reference, variants

from .conftest import CPU, usable_backends

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _assert_ok(report) -> None:
    assert report.ok, "\n".join(report.failures)


# ---------------------------------------------------------------------------------------
# The variant matrix.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_scaler", [False, True], ids=["unscaled", "grad_scaler"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name)
def test_variant_matrix(backend: str, variant: Variant, dtype: torch.dtype, grad_scaler: bool) -> None:
    _assert_ok(run_against_reference(backend, variant, dtype, grad_scaler=grad_scaler))


@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name)
def test_float64(backend: str, variant: Variant) -> None:
    _assert_ok(run_against_reference(backend, variant, torch.float64))


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_state_and_slow_dtype_overrides(backend: str, kind: str) -> None:
    """state_dtype / slow_dtype replace the fp32 defaults of a bf16 model, and the
    reference, given the same overrides, agrees."""
    options = {"lr": 0.01, "state_dtype": torch.bfloat16, "slow_dtype": torch.float16}
    if kind == "sgd":
        options["momentum"] = 0.9
    variant = Variant(kind, tuple(sorted(options.items())))
    _assert_ok(run_against_reference(backend, variant, torch.bfloat16))

    p = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = (LookaheadSGD if kind == "sgd" else LookaheadAdam)([p], backend=backend, **options)
    p.grad = torch.randn_like(p)
    opt.step()
    for key, value in opt.state[p].items():
        if key in ("step", "lookahead_step"):
            continue
        want = torch.float16 if key == "slow_weights" else torch.bfloat16
        assert value.dtype == want, f"state '{key}' is {value.dtype}"


# (parameter dtype, state dtype, slow-weight dtype) that the compiled kernels cover
# themselves: each of state and φ in fp32 or the parameter's own dtype.
COMPILED_STORAGE = [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.float16, torch.float32, torch.float16),
]
COMPILED_BACKENDS = ("cpu", "cuda_emulated", "triton")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("dtypes", COMPILED_STORAGE, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_compiled_kernels_run_their_low_precision_storage(
    backend: str, kind: str, dtypes: tuple[torch.dtype, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16/fp16 state and slow weights (state_dtype=/slow_dtype=) in the kernels' own
    storage paths, against the reference with the same overrides; on a compiled backend the
    generic fallbacks are made to fail, so the test cannot pass on them."""
    dtype, state_dtype, slow_dtype = dtypes
    if backend in COMPILED_BACKENDS:
        from lookahead_fused.backends import eager, foreach

        def fell_back(*args, **kwargs):
            raise AssertionError(f"the {backend} backend fell back instead of running its kernels")

        monkeypatch.setattr(eager, "step", fell_back)
        monkeypatch.setattr(foreach, "step", fell_back)
    options = {"lr": 0.01, "state_dtype": state_dtype, "slow_dtype": slow_dtype, "weight_decay": 0.01}
    if kind == "sgd":
        options["momentum"] = 0.9
    _assert_ok(run_against_reference(backend, Variant(kind, tuple(sorted(options.items()))), dtype))


# ---------------------------------------------------------------------------------------
# Side-by-side runs for parameter lists the matrix does not build.
# ---------------------------------------------------------------------------------------


def _step_reference(
    kind: str, params: Sequence[Tensor], grads: Sequence[Sequence[Tensor | None]], hyper: dict
) -> list[dict]:
    """Run the reference over `params` (modified in place) for len(grads) steps."""
    states = [
        reference.init_state(p, optimizer=kind, momentum=hyper.get("momentum", 0.0),
                             amsgrad=hyper.get("amsgrad", False), inner_state=hyper["inner_state"])
        for p in params
    ]  # fmt: skip
    for step_grads in grads:
        reference.step_group(kind, params, step_grads, states, hyper)
    return states


def _random_grads(params: Sequence[Tensor], steps: int, seed: int = 0) -> list[list[Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=gen).to(p.dtype) if p.requires_grad else None for p in params]
        for _ in range(steps)
    ]


def _hyper(opt: torch.optim.Optimizer) -> dict:
    return {key: value for key, value in opt.param_groups[0].items() if key != "params"}


def _assert_matches(what: str, got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, **TOLERANCES[want.dtype], msg=lambda m: f"{what}: {m}")


def test_sync_and_plain_steps_are_both_exercised(backend: str) -> None:
    """The matrix runs 7 steps with k=3: syncs at steps 3 and 6, plain steps in between.
    After a sync θ equals φ bit for bit; after a plain step the fast weights have moved."""
    p = torch.randn(10, requires_grad=True)
    opt = LookaheadAdam([p], lr=0.1, k=3, backend=backend)
    for t, (g,) in enumerate(_random_grads([p], 7), start=1):
        p.grad = g
        opt.step()
        state = opt.state[p]
        assert state["lookahead_step"].item() == t
        assert torch.equal(p, state["slow_weights"]) == (t % 3 == 0), f"step {t}"


def test_tied_parameter_is_updated_once(backend: str) -> None:
    """A tensor listed twice in a group (tied weights) takes one update per step, as if
    listed once. torch.optim warns about the duplicate; so does this optimizer."""
    tied = torch.randn(6, 4, requires_grad=True)
    other = torch.randn(5, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = LookaheadSGD([tied, other, tied], lr=0.1, momentum=0.9, k=3, backend=backend)
    ref = [tied.detach().clone(), other.detach().clone()]
    grads = _random_grads([tied, other], 4)
    for g_tied, g_other in grads:
        tied.grad, other.grad = g_tied, g_other
        opt.step()
    states = _step_reference("sgd", ref, grads, _hyper(opt))
    for name, p, q, state in zip(("tied", "other"), (tied, other), ref, states, strict=True):
        _assert_matches(name, p, q)
        _assert_matches(f"{name} momentum_buffer", opt.state[p]["momentum_buffer"], state["momentum_buffer"])
        assert opt.state[p]["step"].item() == len(grads), f"{name} stepped more than once per step()"


def test_frozen_and_empty_parameters(backend: str) -> None:
    """A frozen parameter (grad None on every step) is never moved: its syncs lerp φ = θ
    toward θ. An empty parameter steps without error. The others match the reference."""
    live = torch.randn(3, 7, requires_grad=True)
    frozen = torch.randn(8)  # requires_grad=False: .grad stays None
    empty = torch.randn(0, requires_grad=True)
    params = [live, frozen, empty]
    opt = LookaheadAdam(params, lr=0.05, k=3, backend=backend)
    before = frozen.clone()
    ref = [p.detach().clone() for p in params]
    grads = _random_grads(params, 7)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
    states = _step_reference("adam", ref, grads, _hyper(opt))

    assert torch.equal(frozen, before)
    assert opt.state[frozen]["step"].item() == 0
    assert torch.equal(opt.state[frozen]["exp_avg"], torch.zeros_like(frozen))
    assert empty.shape == (0,) and opt.state[empty]["exp_avg"].shape == (0,)
    for i, (p, q, state) in enumerate(zip(params, ref, states, strict=True)):
        _assert_matches(f"param {i}", p, q)
        for key, want in state.items():
            _assert_matches(f"param {i} {key}", opt.state[p][key], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [LookaheadSGD, LookaheadAdam], ids=lambda c: c.__name__)
def test_channels_last_layout_is_kept(backend: str, cls: type, dtype: torch.dtype) -> None:
    """Channels-last parameters stay channels-last through plain and sync steps, and every
    parameter-shaped state entry has the parameter's strides (element i beside element i)."""
    p = torch.randn(4, 3, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    strides = p.stride()
    extra = {"momentum": 0.9} if cls is LookaheadSGD else {}  # SGD has state only with momentum
    opt = cls([p], lr=0.01, k=2, backend=backend, **extra)
    for _ in range(3):  # plain, sync, plain
        p.grad = torch.randn(p.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        opt.step()
        assert p.is_contiguous(memory_format=torch.channels_last) and p.stride() == strides
        for key, value in opt.state[p].items():
            if value.dim():
                assert value.stride() == strides, f"state '{key}' strides {value.stride()} != {strides}"


def test_backend_property_reports_the_resolved_backend(backend: str) -> None:
    p = torch.randn(3, requires_grad=True)
    assert LookaheadSGD([p], lr=0.1, backend=backend).backend == backend


def test_auto_resolves_to_a_usable_backend() -> None:
    p = torch.randn(3, requires_grad=True)
    opt = LookaheadAdam([p], lr=0.1, k=2, backend="auto")
    assert opt.backend in usable_backends()
    assert backends.unavailable(opt.backend, CPU) is None
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p, before)
