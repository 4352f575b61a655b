"""The eager reference: Lookahead around SGD, Adam and AdamW, one tensor at a time.

This file is the specification every backend is tested against. Read it beside
Algorithm 1 of Zhang, Lucas, Hinton, Ba, "Lookahead Optimizer: k steps forward, 1 step
back" (2019, arXiv 1907.08610):

    φ ← θ                                   slow weights start equal to the parameters
    every step():  θ ← θ + A(θ, g)          inner SGD / Adam / AdamW update
                   t ← t + 1                lookahead counter of the parameter group
                   if t mod k == 0:         sync step
                       φ ← φ + α (θ − φ)    slow weights move α of the way (eq. 1)
                       θ ← φ                fast weights restart from the slow ones

The inner updates repeat `torch.optim.SGD` / `torch.optim.Adam` (single-tensor path)
operation for operation, so that with α = 1 a fp32 run here follows torch.optim bit for
bit. The rest of this docstring lists the choices the paper leaves open.

Per-parameter state, in torch.optim's names where torch.optim has one:

    step                  inner steps taken since the state was (re)started, fp32 scalar
    momentum_buffer       SGD with momentum
    exp_avg, exp_avg_sq   Adam's first and second moments
    max_exp_avg_sq        Adam with amsgrad
    slow_weights          φ
    lookahead_step        the group's counter t (every parameter of a group holds the same value)
    cached_momentum_buffer / cached_exp_avg
                          inner_state="pullback" only: the momentum at the previous sync

Mixed precision: the state has its own dtype (fp32 for bf16/fp16 parameters by default).
The math is done in fp32 (fp64 for fp64 parameters); a low-precision parameter is
read once, updated in fp32 and rounded once when written back.

Complex parameters are stepped as torch.optim steps them: as their real view
(`torch.view_as_real`: a (..., 2) tensor of real and imaginary parts), their gradients and
state included, so every operation above is elementwise on the parts (Adam's second moment
is the square of each part, not |g|²; adaptive α's dot products are Re⟨g, d⟩). The state of a
complex parameter is complex, of the parameter's shape.

GradScaler: `grad_scale` divides the gradient before any use (`.grad` itself is never
modified); a step whose `found_inf` is non-zero changes nothing at all, the counters
included.

A parameter whose `.grad` is None gets no inner update (its state does not move) but
still takes part in the sync, as in Algorithm 1.

inner_state at a sync:
    "maintain"  the inner state is left alone (the paper's choice);
    "reset"     the inner state restarts as if new: step 0, zero moments, and SGD's next
                momentum buffer is the gradient itself, exactly as torch.optim starts;
    "pullback"  the momentum (SGD's buffer, Adam's exp_avg) is interpolated like the weights,
                m ← α m + (1 − α) m_cached, then m_cached ← m, with m_cached starting at
                zero as in the authors' code; Adam's second moment is maintained.

Adaptive α (paper §2.1, Adam/AdamW only). The paper picks α by minimising a quadratic
model of the loss along the segment from θ0 (= φ) to θk:

    α̂ = clip( (θ0 − (θk − Â⁻¹∇L(θk)))ᵀ Â (θ0 − θk) / ((θ0 − θk)ᵀ Â (θ0 − θk)), α_low, 1 )

With d = θ0 − θk this is α̂ = 1 + (∇Lᵀ d) / (dᵀ Â d): two dot products per group. Our choices:
    Â   the curvature Adam assumes, Â = (√v̂ + ε) / lr with v̂ = v / (1 − β2^step) (v the
        amsgrad maximum when amsgrad is on): Adam's step is −Â⁻¹ m̂, a preconditioned
        gradient step;
    ∇L  the gradient the inner step just used (unscaled, sign-flipped under maximize, with
        L2 decay for Adam), i.e. the gradient at θ_{k−1}: the freshest one available
        without another backward pass;
    sums run over the parameters of the group that have a gradient in the sync step;
    when dᵀÂd = 0 (the fast weights did not move) the group's α is used.
One α̂ per group; it also drives "pullback".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "sgd_update",
    "adam_update",
    "adaptive_alpha",
    "lookahead_sync",
    "init_state",
    "step_group",
    "MOMENTUM_KEY",
    "RESET_KEYS",
    "as_real",
]

# The state entry each inner optimizer interpolates under inner_state="pullback".
MOMENTUM_KEY = {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg"}
# The inner state that inner_state="reset" zeroes: the inner optimizer's own entries.
RESET_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _math_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _as_math(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The tensor itself when it is already in the math dtype, else an fp32/fp64 copy."""
    return t if t.dtype == dtype else t.to(dtype)


def _write_back(dst: Tensor, src: Tensor) -> None:
    if src is not dst:
        dst.copy_(src)


def as_real(t: Tensor) -> Tensor:
    """A complex tensor's real view (..., 2), as torch.optim steps it; a real tensor itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def _real_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with every complex tensor replaced by its real view (the same memory)."""
    return {key: as_real(v) if isinstance(v, Tensor) else v for key, v in state.items()}


# ---------------------------------------------------------------------------------------
# Inner optimizers: torch.optim's single-tensor updates, operation for operation.
# ---------------------------------------------------------------------------------------


def sgd_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> Tensor:
    """One torch.optim.SGD step for one tensor. `grad` is already unscaled and in the math
    dtype. Returns the gradient the update used (after maximize and weight decay)."""
    md = _math_dtype(param)
    theta = _as_math(param, md)
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g.add(theta, alpha=weight_decay)
    d_p = g
    if momentum != 0:
        buf = _as_math(state["momentum_buffer"], md)
        if state["step"].item() == 0:
            # torch.optim.SGD: the first momentum buffer is the gradient itself.
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        _write_back(state["momentum_buffer"], buf)
        d_p = g.add(buf, alpha=momentum) if nesterov else buf
    state["step"] += 1
    theta.add_(d_p, alpha=-lr)
    _write_back(param, theta)
    return g


def adam_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> Tensor:
    """One torch.optim.Adam (decoupled_weight_decay=False) or AdamW step for one tensor.
    `grad` is already unscaled and in the math dtype. Returns the gradient the moments saw."""
    md = _math_dtype(param)
    theta = _as_math(param, md)
    exp_avg = _as_math(state["exp_avg"], md)
    exp_avg_sq = _as_math(state["exp_avg_sq"], md)
    g = -grad if maximize else grad

    state["step"] += 1
    if weight_decay != 0:
        if decoupled_weight_decay:
            theta.mul_(1 - lr * weight_decay)
        else:
            g = g.add(theta, alpha=weight_decay)

    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    step = state["step"].item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5

    if amsgrad:
        max_exp_avg_sq = _as_math(state["max_exp_avg_sq"], md)
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        _write_back(state["max_exp_avg_sq"], max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    theta.addcdiv_(exp_avg, denom, value=-step_size)

    _write_back(state["exp_avg"], exp_avg)
    _write_back(state["exp_avg_sq"], exp_avg_sq)
    _write_back(param, theta)
    return g


# ---------------------------------------------------------------------------------------
# Lookahead.
# ---------------------------------------------------------------------------------------


def adaptive_alpha(
    params: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    used_grads: Sequence[Tensor | None],
    *,
    lr: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    alpha: float,
    alpha_low: float,
) -> float:
    """α̂ of paper §2.1 for one group: 1 + (gᵀd)/(dᵀÂd), clipped to [alpha_low, 1].
    See the module docstring for the choice of Â and of the gradient."""
    g_dot_d = 0.0
    d_a_d = 0.0
    for param, state, g in zip(params, states, used_grads):
        if g is None:
            continue
        md = _math_dtype(param)
        d = state["slow_weights"].to(md) - param.to(md)  # θ0 − θk
        v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"].to(md)
        bias_correction2 = 1 - beta2 ** state["step"].item()
        curvature = ((v / bias_correction2).sqrt() + eps) / lr  # Â
        g_dot_d += torch.dot(g.flatten().to(torch.float64), d.flatten().to(torch.float64)).item()
        d_a_d += torch.dot((d * curvature).flatten().to(torch.float64), d.flatten().to(torch.float64)).item()
    if d_a_d == 0.0 or not math.isfinite(d_a_d):
        return alpha
    return min(max(1.0 + g_dot_d / d_a_d, alpha_low), 1.0)


def lookahead_sync(param: Tensor, state: dict[str, Any], *, alpha: float, inner_state: str, optimizer: str) -> None:
    """The sync of Algorithm 1 for one tensor, then the inner-state policy."""
    param, state = as_real(param), _real_state(state)
    md = _math_dtype(param)
    slow = _as_math(state["slow_weights"], md)
    slow.lerp_(_as_math(param, md), alpha)  # φ ← φ + α (θ − φ)
    _write_back(state["slow_weights"], slow)
    param.copy_(state["slow_weights"])  # θ ← φ

    if inner_state == "reset":
        for key, value in state.items():
            if key in RESET_KEYS:
                value.zero_()
    elif inner_state == "pullback":
        key = MOMENTUM_KEY[optimizer]
        if key in state:
            m = _as_math(state[key], md)
            cached = _as_math(state["cached_" + key], md)
            m.mul_(alpha).add_(cached, alpha=1 - alpha)  # m ← α m + (1 − α) m_cached
            _write_back(state[key], m)
            state["cached_" + key].copy_(state[key])  # m_cached ← m


def init_state(
    param: Tensor,
    *,
    optimizer: str,
    momentum: float = 0.0,
    amsgrad: bool = False,
    inner_state: str = "maintain",
    state_dtype: torch.dtype | None = None,
    slow_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Fresh state for one parameter: φ ← θ, zero moments, zero counters."""
    low_precision = param.dtype in (torch.bfloat16, torch.float16)
    sdt = state_dtype or (torch.float32 if low_precision else param.dtype)
    pdt = slow_dtype or (torch.float32 if low_precision else param.dtype)
    zeros = lambda: torch.zeros(param.shape, dtype=sdt, device=param.device)  # noqa: E731
    state: dict[str, Any] = {
        "step": torch.zeros((), dtype=torch.float32, device=param.device),
        "lookahead_step": torch.zeros((), dtype=torch.float32, device=param.device),
        "slow_weights": param.detach().to(pdt, copy=True),
    }
    if optimizer == "sgd":
        if momentum != 0:
            state["momentum_buffer"] = zeros()
    else:
        state["exp_avg"] = zeros()
        state["exp_avg_sq"] = zeros()
        if amsgrad:
            state["max_exp_avg_sq"] = zeros()
    key = MOMENTUM_KEY[optimizer]
    if inner_state == "pullback" and key in state:
        state["cached_" + key] = zeros()
    return state


def step_group(
    optimizer: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    states: Sequence[dict[str, Any]],
    group: dict[str, Any],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Lookahead step of one parameter group, as Algorithm 1 states it.

    optimizer: "sgd", "adam" or "adamw". group: the hyperparameters, as in a param group of
    LookaheadSGD / LookaheadAdam / LookaheadAdamW (lr, k, alpha, inner_state, ...)."""
    if found_inf is not None and found_inf.item() != 0:
        return  # GradScaler found an inf/NaN: the step changes nothing, counters included.
    # Complex tensors as their real views (the same memory): see the module docstring.
    params = [as_real(p) for p in params]
    grads = [None if g is None else as_real(g) for g in grads]
    states = [_real_state(s) for s in states]

    used_grads: list[Tensor | None] = []
    for param, grad, state in zip(params, grads, states):
        if grad is None:
            used_grads.append(None)  # no inner update; the parameter still syncs below
            continue
        g = grad.to(_math_dtype(param), copy=True)
        if grad_scale is not None:
            g.div_(grad_scale.to(g.dtype))
        if optimizer == "sgd":
            used = sgd_update(
                param, g, state,
                lr=_float(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                maximize=group["maximize"],
            )  # fmt: skip
        else:
            beta1, beta2 = group["betas"]
            used = adam_update(
                param, g, state,
                lr=_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                maximize=group["maximize"], decoupled_weight_decay=optimizer == "adamw",
            )  # fmt: skip
        used_grads.append(used)

    for state in states:
        state["lookahead_step"] += 1
    t = int(states[0]["lookahead_step"].item()) if states else 0
    if t % group["k"] != 0:
        return

    alpha = group["alpha"]
    if group.get("adaptive_alpha", False):
        alpha = adaptive_alpha(
            params, states, used_grads,
            lr=_float(group["lr"]), beta2=group["betas"][1], eps=group["eps"],
            amsgrad=group["amsgrad"], alpha=group["alpha"], alpha_low=group["alpha_low"],
        )  # fmt: skip
    for param, state in zip(params, states):
        lookahead_sync(param, state, alpha=alpha, inner_state=group["inner_state"], optimizer=optimizer)


def _float(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)
