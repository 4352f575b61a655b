"""What the tests and `python -m lookahead_fused check` share: the variant matrix, the
tolerances (stated here once), and a runner that steps a backend and the reference side by
side on the same inputs and reports the largest differences.

Tolerances are per dtype and apply after every step to the parameters (by their dtype, and
by the least precise dtype of their state where that is less precise: param_tolerances) and
to every state entry by the dtype it is stored in (state_tolerances: the fp32 state and slow
weights of a bf16 model are held to fp32, most elements; a state dtype other than the
reference's is a failure):
    fp32  atol 1e-6, rtol 1e-5: backends differ from the reference only in the order of
          fp32 operations (a few ulps per step);
    fp64  atol 1e-12, rtol 1e-10;
    bf16  atol 1e-2, rtol 1.6e-2 (two bf16 ulps): the fp32 math agrees to a few fp32 ulps,
          but the parameter is rounded to bf16 after every step, and a difference of one fp32
          ulp can round to the neighbouring bf16 value; the fp32 state then sees that
          parameter through weight decay and the sync;
    fp16  atol 1e-3, rtol 2e-3 (four fp16 ulps), for the same reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import reference
from ._buckets import COUNTER_KEYS
from .optimizers import LookaheadAdam, LookaheadAdamW, LookaheadSGD

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
# A complex tensor is compared as its real view (reference.as_real), at its parts' tolerance.
TOLERANCES[torch.complex64] = TOLERANCES[torch.float32]
TOLERANCES[torch.complex128] = TOLERANCES[torch.float64]

CLASSES = {"sgd": LookaheadSGD, "adam": LookaheadAdam, "adamw": LookaheadAdamW}


@dataclass(frozen=True)
class Variant:
    kind: str  # "sgd" | "adam" | "adamw"
    options: tuple[tuple[str, Any], ...] = ()  # constructor keyword arguments
    groups: int = 1  # >1: the parameters split in groups with their own k and alpha

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kind}({opts})" + (f"x{self.groups}groups" if self.groups > 1 else "")


def _v(kind: str, groups: int = 1, **options: Any) -> Variant:
    return Variant(kind, tuple(sorted(options.items())), groups)


def variants() -> list[Variant]:
    """Every flag of every inner optimizer at least once, each with the three inner_state
    policies, plus adaptive α and per-group k/alpha."""
    inner = [
        _v("sgd", lr=0.05),
        _v("sgd", lr=0.05, momentum=0.9),
        _v("sgd", lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        _v("sgd", lr=0.05, momentum=0.8, nesterov=True, maximize=True),
        _v("sgd", lr=0.05, weight_decay=0.1, maximize=True),
        _v("adam", lr=0.01),
        _v("adam", lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True),
        _v("adam", lr=0.01, maximize=True, weight_decay=0.01),
        _v("adamw", lr=0.01),
        _v("adamw", lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True),
    ]
    out = []
    for v, inner_state in itertools.product(inner, ("maintain", "reset", "pullback")):
        out.append(Variant(v.kind, tuple(sorted({**v.kwargs, "inner_state": inner_state}.items()))))
    out.append(_v("adam", lr=0.01, adaptive_alpha=True, alpha_low=0.2))
    out.append(_v("adamw", lr=0.01, adaptive_alpha=True, amsgrad=True, inner_state="pullback"))
    out.append(_v("sgd", groups=2, lr=0.05, momentum=0.9))
    out.append(_v("adam", groups=2, lr=0.01, inner_state="pullback"))
    return out


# Shapes that exercise the bucket walk: matrices, a vector, a 0-dim scalar, an empty tensor,
# an odd size, and a channels-last convolution weight.
SHAPES: list[tuple[int, ...]] = [(7, 5), (33,), (), (0, 4), (3, 4, 3, 3)]
NO_GRAD_INDEX = 1  # the (33,) vector: its gradient is None on some steps, synced all the same
# The 0-based steps on which it has none: a plain step and, at k = 3, both sync steps of the
# default 7 (a parameter without a gradient is still synced: φ and θ move, its state does not).
NO_GRAD_STEPS = (1, 2, 5)
# The default α of the side-by-side runs: not 0.5, where α and 1 - α give the same answer, so
# an interpolation written backwards (θ + α(φ − θ)) would pass unseen.
ALPHA = 0.7


def make_params(dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> list[Tensor]:
    """The parameters of SHAPES in `dtype` (complex: random real and imaginary parts)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = _randn(shape, gen, dtype).to(device=device)
        if len(shape) == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(p.requires_grad_())
    return params


def _randn(shape: tuple[int, ...] | torch.Size, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def _grad(p: Tensor, gen: torch.Generator, scale: float) -> Tensor:
    g = _randn(p.shape, gen, p.dtype).to(device=p.device) * scale
    return g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g


@dataclass
class Report:
    """The largest difference seen between backend and reference, and where."""

    max_abs: float = 0.0
    worst: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def compare(
        self, what: str, got: Tensor, want: Tensor, tol: dict[str, float], most: dict[str, float] | None = None
    ) -> None:
        """Every element within `tol`; and, given `most`, at least MOST_WITHIN of them within it.
        Complex tensors are compared part by part (their real views)."""
        if got.shape != want.shape:
            self.failures.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        if got.dtype != want.dtype:  # stored in another dtype than the reference stores it
            self.failures.append(f"{what}: dtype {got.dtype} != {want.dtype}")
            return
        got64 = reference.as_real(got.detach()).double().cpu()
        want64 = reference.as_real(want.detach()).double().cpu()
        if got64.numel() == 0:
            return
        err = (got64 - want64).abs().max().item()
        if not err <= self.max_abs:
            self.max_abs, self.worst = err, what
        if not torch.allclose(got64, want64, **tol):  # type: ignore[arg-type]  # atol, rtol: floats
            self.failures.append(f"{what}: max abs error {err:.3g} beyond atol={tol['atol']} rtol={tol['rtol']}")
        elif most is not None:
            within = torch.isclose(got64, want64, **most).double().mean().item()  # type: ignore[arg-type]  # as above
            if within < MOST_WITHIN:
                self.failures.append(
                    f"{what}: only {within:.0%} of the elements within atol={most['atol']} rtol={most['rtol']} "
                    f"(stored as {got.dtype})"
                )


# Of a tensor stored more precisely than its parameter (the fp32 state and slow weights of a
# bf16/fp16 model), at least this fraction of the elements must agree at the stored dtype's
# tolerance; the rest at the parameter's. Measured: when a backend's fp32 math differs from the
# reference's by an ulp, the parameter can round to the neighbouring bf16/fp16 value, and the
# state then follows that parameter (weight decay, the sync's lerp) by a parameter ulp: a few
# elements, never most (88% of fp32 slow weights of a bf16 model are not bf16 values, and a
# backend that rounds φ to bf16 moves nearly all of them: tests/test_emulation_planted.py).
MOST_WITHIN = 0.9


def _precision_rank(dtype: torch.dtype) -> int:
    return {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}[dtype]


def state_tolerances(param_dtype: torch.dtype, state: Tensor) -> tuple[dict[str, float], dict[str, float] | None]:
    """(tolerance of every element, tolerance of most elements or None) for a state tensor,
    by the dtype it is stored in: a value is as precise as the less precise of its storage and
    the math that made it (fp64 for fp64 parameters, else fp32). Counters and other
    non-float state must be equal."""
    param_dtype = param_dtype.to_real()  # a complex parameter and its state: as their parts
    if state.is_complex():
        state = state.real
    if not state.is_floating_point():
        return {"atol": 0.0, "rtol": 0.0}, None
    math = torch.float64 if param_dtype == torch.float64 else torch.float32
    return _held_to(min(state.dtype, math, key=_precision_rank), param_dtype)


def _held_to(own: torch.dtype, source: torch.dtype) -> tuple[dict[str, float], dict[str, float] | None]:
    """The tolerances of a tensor stored in `own` whose values also come through `source`:
    where `source` is the less precise, every element at its tolerance and at least
    MOST_WITHIN of them at `own`'s; else `own`'s for every element."""
    if _precision_rank(source) < _precision_rank(own):
        return TOLERANCES[source], TOLERANCES[own]
    return TOLERANCES[own], None


def param_tolerances(
    param_dtype: torch.dtype, state: dict[str, Any]
) -> tuple[dict[str, float], dict[str, float] | None]:
    """(tolerance of every element, tolerance of most elements or None) for a parameter whose
    state is `state`: a parameter is as precise as the least precise storage its value comes
    from. With slow weights in bf16/fp16 under an fp32 parameter, θ is a bf16/fp16 value after
    every sync (θ ← φ), and a parameter that is a few fp32 ulps off the reference before the
    sync (another order of fp32 operations) can round to the neighbouring bf16 value; with the
    state in bf16/fp16, its update carries the state's rounding. Then every element is held to
    that dtype's tolerance and at least MOST_WITHIN of them to the parameter's own (measured:
    one element of 65,875 after a sync at α̂ = 1, tests/test_fuzz.py). The fp32 counters are
    not such storage: they hold no element's value."""
    param_dtype = param_dtype.to_real()
    stored = param_dtype
    for key, value in state.items():
        if key not in COUNTER_KEYS and isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            stored = min(stored, value.dtype.to_real(), key=_precision_rank)
    return _held_to(param_dtype, stored)


def reference_states(kind: str, params: list[Tensor], hyper: dict[str, Any]) -> list[dict[str, Any]]:
    """Fresh reference state for the parameters of one group with hyperparameters `hyper`."""
    return [
        reference.init_state(
            p, optimizer=kind, momentum=hyper.get("momentum", 0.0), amsgrad=hyper.get("amsgrad", False),
            inner_state=hyper["inner_state"], state_dtype=hyper["state_dtype"], slow_dtype=hyper["slow_dtype"],
        )
        for p in params
    ]  # fmt: skip


def compare_step(
    report: Report,
    step: int,
    opt: torch.optim.Optimizer,
    params: list[Tensor],
    ref_params: list[Tensor],
    ref_states: list[dict[str, Any]],
) -> None:
    """Compare the parameters and every reference state entry after step `step` (1-based)."""
    for i, (p, want_p, want_state) in enumerate(zip(params, ref_params, ref_states, strict=True)):
        where = f"step {step} param {i}"
        report.compare(where, p, want_p, *param_tolerances(p.dtype, want_state))
        got_state = opt.state[p]
        for key, want in want_state.items():
            if key not in got_state:
                report.failures.append(f"{where}: state '{key}' missing")
            else:
                report.compare(f"{where} {key}", got_state[key], want, *state_tolerances(p.dtype, got_state[key]))


def run_against_reference(
    backend: str,
    variant: Variant,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    steps: int = 7,
    k: int = 3,
    alpha: float = ALPHA,
    grad_scaler: bool = False,
    seed: int = 0,
) -> Report:
    """Step `backend` and the reference side by side for `steps` steps and compare the
    parameters and every state entry after each one.

    The parameters are those of SHAPES; the (33,) vector has no gradient on the steps
    NO_GRAD_STEPS, sync steps among them (no inner update, still synced). With
    grad_scaler=True the gradients are scaled by 1024, grad_scale/found_inf are passed as
    GradScaler does, and one step has found_inf set (an inf in a gradient): that step must
    change nothing."""
    params = make_params(dtype, device, seed)
    ref_params = [p.detach().clone() for p in params]
    kwargs = {"k": k, "alpha": alpha, **variant.kwargs}
    cls = CLASSES[variant.kind]

    if variant.groups > 1:
        split = len(params) // 2
        groups = [
            {"params": params[:split]},
            {"params": params[split:], "k": k + 1, "alpha": min(1.0, alpha + 0.25)},
        ]
        opt = cls(groups, backend=backend, **kwargs)
    else:
        opt = cls(params, backend=backend, **kwargs)
    ref_groups = []
    offset = 0
    for group in opt.param_groups:
        n = len(group["params"])
        hyper = {key: value for key, value in group.items() if key != "params"}
        ref_groups.append((ref_params[offset : offset + n], hyper))
        offset += n
    ref_states = [reference_states(variant.kind, ps, h) for ps, h in ref_groups]

    gen = torch.Generator().manual_seed(seed + 1)
    scale = 1024.0 if grad_scaler else 1.0
    report = Report()
    for step in range(steps):
        inf_step = grad_scaler and step == 2
        grads = []
        for i, p in enumerate(params):
            g = None if (i == NO_GRAD_INDEX and step in NO_GRAD_STEPS) else _grad(p, gen, scale)
            if g is not None and inf_step and i == 0 and g.numel():
                g.view(-1)[0] = float("inf")
            grads.append(g)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        grad_scale = found_inf = None
        if grad_scaler:
            grad_scale = torch.tensor(scale, device=device)
            found_inf = torch.tensor(1.0 if inf_step else 0.0, device=device)
            opt.grad_scale, opt.found_inf = grad_scale, found_inf
        opt.step()
        if grad_scaler:
            del opt.grad_scale, opt.found_inf
        offset = 0
        for (ps, hyper), states in zip(ref_groups, ref_states):
            gs = grads[offset : offset + len(ps)]
            offset += len(ps)
            reference.step_group(variant.kind, ps, gs, states, hyper, grad_scale=grad_scale, found_inf=found_inf)

        compare_step(report, step + 1, opt, params, ref_params, [s for states in ref_states for s in states])
    return report
