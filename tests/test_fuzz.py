"""Property-based differential test: every usable backend against the eager reference.

Hypothesis draws whole short training runs: 1-6 parameters of random shapes (0-dim, empty,
odd sizes up to MAX_NUMEL elements, 1-4 dims, channels-last 4-d) and dtypes (fp32, bf16,
fp16, complex64, mixed within the group, hence several buckets), an inner optimizer with random flags,
k, alpha, 1-15 steps, which parameters have no gradient in which step, optional GradScaler
inputs with inf steps, and a checkpoint/resume point; now and then a tensor of more than
LARGE_NUMEL elements (several work chunks on every backend: 65,536 elements on the CPU and
under the Triton interpreter, 256 in the CUDA emulation), a second param group with its own
k and alpha, capturable=True, a tensor lr, and state_dtype/slow_dtype overrides (only for
groups without complex parameters, where overrides are refused). The
backend's parameters and every
state entry must match `lookahead_fused.reference` after every step within
`lookahead_fused.testing.TOLERANCES`, including after the run was interrupted, saved through
torch.save / torch.load(weights_only=True) and resumed in a new optimizer.

Generator choices, made so that the tolerances stay meaningful:
- parameters are standard normal; gradients are standard normal times a magnitude drawn from
  GRAD_MAGNITUDES (times grad_scale under GradScaler), fresh every step from a torch
  Generator seeded by the example. They do not depend on the parameters, so nothing
  diverges: an update stays a small fraction of a parameter and a few-ulp difference
  between backend and reference stays a few ulps;
- learning rates are moderate (SGD 1e-3..0.1, Adam 1e-4..0.1), alpha and alpha_low are at
  least 1e-3 (smaller values only test how a double rounds to fp32);
- grad_scale is 2**e, e in [-2, 10]: with |standard normal| below ~6 the scaled fp16
  gradient stays finite (6 × 2**10 < 65504) except where an inf is put on purpose.

    python -m pytest tests/test_fuzz.py                          # "ci": 40 examples per backend,
                                                                 # derandomized: CI is reproducible
    LOOKAHEAD_FUSED_FUZZ=long python -m pytest tests/test_fuzz.py  # 2000 random examples per backend

What the examples reached (how many had a sync step that moved the weights, how many had a
multi-chunk tensor, two groups, ...) is printed per backend at the end of the session
(COVERAGE, tests/conftest.py's terminal summary).
"""

from __future__ import annotations

import io
import itertools
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lookahead_fused import reference
from lookahead_fused.testing import CLASSES, Report, compare_step, reference_states

from .conftest import usable_backends

settings.register_profile("lookahead_fused_fuzz_ci", max_examples=40, deadline=None, derandomize=True, database=None)
settings.register_profile("lookahead_fused_fuzz_long", max_examples=2000, deadline=None)
_PROFILE = os.environ.get("LOOKAHEAD_FUSED_FUZZ", "ci")
if _PROFILE not in ("ci", "long"):
    raise ValueError(f"Invalid LOOKAHEAD_FUSED_FUZZ: {_PROFILE!r} (choose from 'ci', 'long')")
# Applied to this test only, so that other hypothesis tests keep their own settings.
FUZZ_SETTINGS = settings.get_profile(f"lookahead_fused_fuzz_{_PROFILE}")

MAX_NUMEL = 4096
# A "large" tensor: more than one work chunk on every backend (the CPU's and the Triton
# interpreter's chunk is 65,536 elements), drawn rarely (it costs the interpreter seconds).
LARGE_NUMEL = 65536
# backend -> what its examples reached (printed by tests/conftest.py at the end of the run).
COVERAGE: defaultdict[str, Counter] = defaultdict(Counter)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the first is what a failure shrinks to
# Complex parameters (stepped as their real views, in buckets of their own): drawn for about
# one tensor in eight, so that most examples mix them with real ones or have none.
PARAM_DTYPES = st.sampled_from(DTYPES * 7 + (torch.complex64,) * 3)
GRAD_MAGNITUDES = (1.0, 0.1, 0.01)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False
    grad_like_param: bool = True  # False: a contiguous gradient for a channels-last parameter


@dataclass(frozen=True)
class Case:
    kind: str  # "sgd" | "adam" | "adamw"
    options: dict[str, Any]  # constructor keyword arguments, k and alpha included
    tensors: tuple[TensorSpec, ...]
    steps: int
    no_grad: tuple[tuple[bool, ...], ...]  # no_grad[step][i]: parameter i has .grad None
    grad_magnitude: float
    grad_scale: float | None  # None: no GradScaler
    found_inf: tuple[bool, ...]  # per step; an inf is put in a gradient where possible
    resume_at: int | None  # before this step: state_dict -> bytes -> a new optimizer
    seed: int
    # The parameters from this index on form a second group with these k and alpha (None: one group).
    split: int | None = None
    second: dict[str, Any] | None = None
    tensor_lr: bool = False  # lr given as a 0-dim tensor


# -- strategies ----------------------------------------------------------------------------


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """0 to 4 dims of at most MAX_NUMEL elements in all (each dim up to the ndim-th root of it,
    so no dim takes the whole budget); about one in eight non-scalar shapes is empty."""
    ndim = draw(st.integers(0, 4))
    if ndim == 0:
        return ()
    side = round(MAX_NUMEL ** (1 / ndim))
    shape = [draw(st.integers(1, side)) for _ in range(ndim)]
    if draw(st.sampled_from((False,) * 7 + (True,))):
        shape[draw(st.integers(0, ndim - 1))] = 0
    return tuple(shape)


@st.composite
def tensor_specs(draw: st.DrawFn) -> TensorSpec:
    if draw(st.sampled_from((False,) * 15 + (True,))):  # one in 16: several chunks
        return TensorSpec((LARGE_NUMEL + draw(st.integers(1, 700)),), draw(PARAM_DTYPES))
    shape = draw(shapes())
    channels_last = len(shape) == 4 and draw(st.booleans())
    return TensorSpec(
        shape,
        draw(PARAM_DTYPES),
        channels_last,
        grad_like_param=not channels_last or draw(st.booleans()),
    )


def _zero_or(low: float, high: float) -> st.SearchStrategy[float]:
    # Zero first: the option switched off is what a failure shrinks to. No values between 0 and
    # `low`: a coefficient of 1e-300 only tests how a double rounds to fp32.
    return st.just(0.0) | st.floats(low, high)


@st.composite
def sgd_options(draw: st.DrawFn) -> dict[str, Any]:
    momentum = draw(_zero_or(0.01, 0.99))
    nesterov = momentum > 0 and draw(st.booleans())  # torch.optim.SGD: needs momentum, no dampening
    return dict(
        lr=draw(st.floats(1e-3, 0.1)),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(_zero_or(0.01, 0.9)),
        nesterov=nesterov,
        weight_decay=draw(_zero_or(1e-4, 0.1)),
        maximize=draw(st.booleans()),
    )


@st.composite
def adam_options(draw: st.DrawFn) -> dict[str, Any]:
    options = dict(
        lr=draw(st.floats(1e-4, 0.1)),
        betas=(draw(_zero_or(0.01, 0.99)), draw(st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from((1e-8, 1e-6, 1e-3))),
        weight_decay=draw(_zero_or(1e-4, 0.1)),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
        adaptive_alpha=draw(st.booleans()),
    )
    if options["adaptive_alpha"]:
        options["alpha_low"] = draw(st.floats(1e-3, 1.0))
    return options


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(("sgd", "adam", "adamw")))
    options = draw(sgd_options() if kind == "sgd" else adam_options())
    options.update(
        k=draw(st.integers(1, 6)),
        alpha=draw(st.floats(1e-3, 1.0)),
        inner_state=draw(st.sampled_from(("maintain", "reset", "pullback"))),
    )
    options["capturable"] = draw(st.booleans())
    tensors = tuple(draw(st.lists(tensor_specs(), min_size=1, max_size=6)))
    # State and slow weights in other dtypes; refused for complex parameters (docs/bad-inputs.md).
    if not any(t.dtype.is_complex for t in tensors) and draw(st.sampled_from((False, False, True))):
        overrides = st.sampled_from((None, torch.float32, torch.bfloat16, torch.float16))
        options.update(state_dtype=draw(overrides), slow_dtype=draw(overrides))
    split = draw(st.none() | st.integers(1, len(tensors) - 1)) if len(tensors) > 1 else None
    second = None if split is None else dict(k=draw(st.integers(1, 6)), alpha=draw(st.floats(1e-3, 1.0)))
    steps = draw(st.integers(1, 15))
    per_step = lambda elements: st.lists(elements, min_size=steps, max_size=steps).map(tuple)
    no_grad = draw(per_step(st.lists(st.booleans(), min_size=len(tensors), max_size=len(tensors)).map(tuple)))
    grad_scale = draw(st.none() | st.integers(-2, 10).map(lambda e: 2.0**e))
    found_inf = draw(per_step(st.booleans())) if grad_scale is not None else (False,) * steps
    return Case(
        kind,
        options,
        tensors,
        steps,
        no_grad,
        grad_magnitude=draw(st.sampled_from(GRAD_MAGNITUDES)),
        grad_scale=grad_scale,
        found_inf=found_inf,
        resume_at=draw(st.none() | st.integers(0, steps - 1)),
        seed=draw(st.integers(0, 2**32 - 1)),
        split=split,
        second=second,
        tensor_lr=draw(st.booleans()),
    )


# -- the runner ----------------------------------------------------------------------------


def _layout(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _randn(spec: TensorSpec, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    """Standard normal times scale, drawn in fp32 and rounded to the spec's dtype once
    (complex: real and imaginary parts each normal)."""
    if spec.dtype.is_complex:
        return torch.randn(spec.shape, generator=gen, dtype=spec.dtype) * scale
    return (torch.randn(spec.shape, generator=gen) * scale).to(spec.dtype)


def _make_params(case: Case, gen: torch.Generator) -> list[Tensor]:
    return [_layout(_randn(spec, gen), spec.channels_last).requires_grad_() for spec in case.tensors]


def _make_grads(case: Case, step: int, gen: torch.Generator) -> list[Tensor | None]:
    """This step's gradients, scaled as GradScaler scales them; on a found_inf step the first
    non-empty one holds an inf. Every gradient is drawn, used or not, so that the values do
    not depend on the no-grad mask while a failure shrinks."""
    scale = case.grad_magnitude * (case.grad_scale or 1.0)
    grads: list[Tensor | None] = []
    for spec, missing in zip(case.tensors, case.no_grad[step], strict=True):
        g = _randn(spec, gen, scale)
        grads.append(None if missing else _layout(g, spec.channels_last and spec.grad_like_param))
    if case.found_inf[step]:
        target = next((g for g in grads if g is not None and g.numel()), None)
        if target is not None:
            target[(0,) * target.dim()] = float("inf")
    return grads


def _build(case: Case, params: list[Tensor], backend: str) -> torch.optim.Optimizer:
    options = dict(case.options)
    if case.tensor_lr:
        options["lr"] = torch.tensor(options["lr"])
    if case.split is None:
        return CLASSES[case.kind](params, backend=backend, **options)
    groups = [{"params": params[: case.split]}, {"params": params[case.split :], **(case.second or {})}]
    return CLASSES[case.kind](groups, backend=backend, **options)


def _resume(
    opt: torch.optim.Optimizer, params: list[Tensor], backend: str, case: Case
) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """Checkpoint through bytes, as a real save/restore does, into a new optimizer over copies
    of the parameters."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)
    params = [p.detach().clone().requires_grad_() for p in params]  # clone keeps channels-last
    opt = _build(case, params, backend)
    opt.load_state_dict(state_dict)
    return opt, params


def run_case(backend: str, case: Case) -> Report:
    """Step `backend` and the reference side by side on the same inputs (as
    testing.run_against_reference does) and compare after every step."""
    gen = torch.Generator().manual_seed(case.seed)
    params = _make_params(case, gen)
    ref_params = [p.detach().clone() for p in params]
    opt = _build(case, params, backend)
    bounds = [0, len(params)] if case.split is None else [0, case.split, len(params)]
    groups = []  # (first, end, hyperparameters) of each group, for the reference
    for (first, end), group in zip(itertools.pairwise(bounds), opt.param_groups, strict=True):
        groups.append((first, end, {key: value for key, value in group.items() if key != "params"}))
    ref_states = [s for first, end, hyper in groups for s in reference_states(case.kind, ref_params[first:end], hyper)]

    report = Report()
    live_syncs = 0
    for step in range(case.steps):
        if step == case.resume_at:
            opt, params = _resume(opt, params, backend, case)
        grads = _make_grads(case, step, gen)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        grad_scale = found_inf = None
        if case.grad_scale is not None:
            grad_scale = torch.tensor(case.grad_scale)
            found_inf = torch.tensor(float(case.found_inf[step]))
            opt.grad_scale, opt.found_inf = grad_scale, found_inf  # as GradScaler.step hands them over
        opt.step()
        if grad_scale is not None:
            del opt.grad_scale, opt.found_inf
        for first, end, hyper in groups:
            states = ref_states[first:end]
            before = int(states[0]["lookahead_step"]) if states else 0
            reference.step_group(
                case.kind, ref_params[first:end], grads[first:end], states, hyper,
                grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip
            if states and int(states[0]["lookahead_step"]) != before and (before + 1) % hyper["k"] == 0:
                live_syncs += 1  # a sync that ran (not skipped by found_inf)

        compare_step(report, step + 1, opt, params, ref_params, ref_states)
    _record(backend, case, live_syncs)
    return report


def _record(backend: str, case: Case, live_syncs: int) -> None:
    seen = COVERAGE[backend]
    seen["examples"] += 1
    seen["with a live sync"] += live_syncs > 0
    seen["multi-chunk tensor"] += any(math.prod(t.shape) > LARGE_NUMEL for t in case.tensors)
    seen["two groups"] += case.split is not None
    seen["capturable"] += bool(case.options.get("capturable"))
    seen["tensor lr"] += case.tensor_lr
    seen["complex"] += any(t.dtype.is_complex for t in case.tensors)
    seen["dtype overrides"] += any(case.options.get(k) is not None for k in ("state_dtype", "slow_dtype"))
    seen["GradScaler"] += case.grad_scale is not None
    seen["resumed"] += case.resume_at is not None


@pytest.mark.parametrize("backend", usable_backends())
@FUZZ_SETTINGS
@given(case=cases())
def test_backend_matches_reference(backend: str, case: Case) -> None:
    report = run_case(backend, case)
    assert report.ok, f"{backend} differs from the reference:\n" + "\n".join(report.failures[:10])
