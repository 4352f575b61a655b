"""Backend "foreach": Lookahead with torch._foreach_* ops, one set of calls per bucket.

It runs on every device and is what "auto" falls back to where no fused kernel exists. The
math is that of `lookahead_fused.reference` (read it first); this file only lays the same
math out over lists of tensors (one list per bucket: one device, one dtype) and, where one op
over a whole bucket beats a list, over the bucket's flat state buffers.

A step takes one of two paths.

Host path (no GradScaler `found_inf`, `capturable=False`)
    The host knows every counter: the group's lookahead counter (`bucket.host_count`) and each
    parameter's inner step (a mirror kept in `bucket.backend_cache`), both read from the
    device once and then kept up to date. Bias corrections and SGD's first-step rule are
    Python floats (the fast ScalarList forms of the foreach ops), and whether this is a sync
    step is a Python bool: a plain step does not touch the slow weights at all.

Device path (GradScaler's `found_inf` given, or `capturable=True`)
    Nothing is read back to the host, so the step can be captured in a CUDA graph. The
    counters advance by (1 − found_inf) on the device; per-parameter coefficients are 0-dim
    tensors computed from the step counters; the sync decision is a device tensor and the
    sync runs on every step behind masks: the slow weights move by a lerp whose weight is α on
    a sync step and exactly 0 otherwise (torch.lerp returns its start exactly for weight 0 and
    its end for weight 1, given finite inputs), θ ← φ is a lerp with weight 1 or 0, and reset
    and pullback are masked likewise. A step with found_inf set changes nothing: its
    gradients (which may hold inf or NaN) are replaced by zeros with a where before any
    arithmetic, and every update is then multiplied by an exact 0, so every tensor keeps its
    value. (Bit for bit, except that a −0.0 may come back as +0.0: x + 0 = +0 for x = −0.)
    The price is work on every step: the slow weights are read and written, and adaptive α
    computed, whether the step syncs or not.

In both paths parameters and state stored in a narrower dtype than the math (bf16/fp16
parameters, `state_dtype=`/`slow_dtype=` overrides) are copied to fp32 (fp64 for fp64
parameters) for the math and rounded once when written back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor

from .. import reference
from .._buckets import Bucket, view_like
from ._capture import capturing

# A hyperparameter or coefficient: a Python number on the host path, a 0-dim tensor on the
# device path. The foreach ops take either (Scalar / Tensor overloads), so the math is written once.
# A list[Number] (all floats, or all tensors) matches neither of the stubs' overloads, a list of
# numbers or a list of tensors, so passing one to a foreach op needs a `type: ignore[arg-type]`.
Number = float | Tensor
# Tensors as the foreach ops take them: a list, or the tuple a foreach op returns.
_Tensors = list[Tensor] | tuple[Tensor, ...]

# The state "reset" restarts (reference.lookahead_sync): moments and the inner step, not the
# slow weights, the lookahead counter or the pullback caches.

# bucket.backend_cache key: (the host_count it is valid for, the host's copy of flat["step"]).
_HOST_STEPS = "foreach_host_steps"


def unavailable(device: torch.device) -> str | None:
    return None  # plain torch ops: every device torch supports


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    # Under CUDA-graph capture the device path, whatever `capturable` says: the host path's
    # sync decision would be baked into the graph and replayed forever.
    on_device = found_inf is not None or bool(group.get("capturable", False)) or capturing()
    contexts = [_Context.make(b, group, on_device, grad_scale, found_inf) for b in buckets]
    used = [_inner_step(kind, c, group, g) for c, g in zip(contexts, grads, strict=True)]
    syncs = [c.advance_lookahead(group["k"]) for c in contexts]
    # Host path: only the buckets whose counter says so (all or none: they count together).
    # Device path: every bucket, behind its mask.
    syncing = [(c, u, s) for c, u, s in zip(contexts, used, syncs, strict=True) if s is not False]
    if syncing:
        _sync_group(kind, group, syncing)
    for c in contexts:
        c.finish()


# ---------------------------------------------------------------------------------------
# Per-bucket context: what differs between the host path and the device path.
# ---------------------------------------------------------------------------------------


@dataclass
class _Context:
    bucket: Bucket
    md: torch.dtype  # the math dtype: fp64 for fp64 parameters, else fp32
    lr: Number
    grad_scale: Tensor | None
    skip: Literal[False] | Tensor  # False, or (found_inf != 0) as a 0-dim bool tensor on the bucket's device
    ok: Number  # 1 − skip: 1.0, or a 0-dim tensor of the math dtype holding exactly 1 or 0
    host_steps: list[float] | None  # host path: the host's copy of flat["step"]; device path: None

    @classmethod
    def make(
        cls, bucket: Bucket, group: dict[str, Any], on_device: bool, grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> _Context:
        md = torch.float64 if bucket.dtype == torch.float64 else torch.float32
        lr = group["lr"]
        scale = None if grad_scale is None else grad_scale.to(bucket.device)
        if not on_device:
            # A tensor lr is read on the host here; capturable=True keeps it on the device.
            return cls(bucket, md, float(lr), scale, False, 1.0, _host_steps(bucket))
        if isinstance(lr, Tensor):
            lr = lr.to(device=bucket.device, dtype=md)  # put lr on the parameters' device to capture the step
        skip: Literal[False] | Tensor = False
        ok: Number = 1.0
        if found_inf is not None:
            skip = found_inf.to(bucket.device) != 0
            ok = (~skip).to(md)
        bucket.host_count = None  # the counters now move on the device only
        bucket.backend_cache.pop(_HOST_STEPS, None)
        return cls(bucket, md, lr, scale, skip, ok, None)

    def per_param(self, fn: Callable[[Any], Any], idx: Sequence[int]) -> list[Number]:
        """fn of each inner step counter of idx: Python floats from the host's copy, or 0-dim
        tensors computed on the device from flat["step"] at once (in fp64 as the host does, fp32
        where the device has no fp64). fn takes a float or a tensor alike."""
        if self.host_steps is not None:
            return [fn(self.host_steps[i]) for i in idx]
        device = self.bucket.device
        steps = self.bucket.flat["step"].to(torch.float32 if device.type == "mps" else torch.float64)
        values = fn(steps).to(self.md).unbind(0)
        return [values[i] for i in idx]

    def math_grads(self, grads: list[Tensor], modified: bool) -> list[Tensor]:
        """The gradients in the math dtype, unscaled, and zero on a skipped step. `.grad` itself
        is never written: when the math modifies the gradients they are copied first."""
        if not modified and self.grad_scale is None and self.skip is False and all(g.dtype == self.md for g in grads):
            return grads
        flat, copies = _flat_copies(grads, self.md)
        if self.skip is not False:
            flat.masked_fill_(self.skip, 0)  # a where: inf/NaN never reaches the arithmetic
        if self.grad_scale is not None:
            flat.div_(self.grad_scale)
        return copies

    def advance_steps(self, idx: Sequence[int]) -> None:
        """Inner step += 1 for the parameters of idx (those with a gradient), by ok on the device."""
        counters = self.bucket.flat["step"]
        if len(idx) == len(self.bucket.params):
            counters.add_(self.ok)
        else:
            torch._foreach_add_([counters[i] for i in idx], self.ok)
        if self.host_steps is not None:
            for i in idx:
                self.host_steps[i] += 1

    def advance_lookahead(self, k: int) -> bool | Tensor:
        """The group's counter t += 1 (by ok on the device); returns whether t % k == 0: a bool
        on the host path, a 0-dim bool tensor (False on a skipped step) on the device path."""
        counters = self.bucket.flat["lookahead_step"]
        counters.add_(self.ok)
        if self.host_steps is not None:
            assert self.bucket.host_count is not None
            self.bucket.host_count += 1
            return self.bucket.host_count % k == 0
        sync = torch.remainder(counters[0], k) == 0
        return sync if self.skip is False else sync & ~self.skip

    def finish(self) -> None:
        if self.host_steps is not None:
            self.bucket.backend_cache[_HOST_STEPS] = (self.bucket.host_count, self.host_steps)


def _host_steps(bucket: Bucket) -> list[float]:
    """The host's copy of the bucket's inner step counters, read from the device only when the
    host does not know them (first step, after a device-path step or another backend's step:
    any step moves host_count or sets it to None)."""
    cached = bucket.backend_cache.get(_HOST_STEPS)
    if bucket.host_count is not None and cached is not None and cached[0] == bucket.host_count:
        return cached[1]
    flat = bucket.flat
    counters = torch.cat((flat["lookahead_step"][:1], flat["step"])).tolist()  # one read
    bucket.host_count = int(counters[0])
    return counters[1:]


# ---------------------------------------------------------------------------------------
# Helpers over lists of tensors.
# ---------------------------------------------------------------------------------------


def _flat_copies(tensors: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """Copies of `tensors` in `dtype`, as views (same shapes and strides) of one flat buffer,
    so that a whole-bucket operation on them is one call."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
    views, offset = [], 0
    for t in tensors:
        views.append(view_like(flat, offset, t))
        offset += t.numel()
    torch._foreach_copy_(views, list(tensors))
    return flat, views


def _in_dtype(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The tensors themselves when they have `dtype`, else copies in it."""
    return tensors if all(t.dtype == dtype for t in tensors) else _flat_copies(tensors, dtype)[1]


class _MathCopies:
    """Stand-ins in the math dtype for tensors stored in another one; `store()` writes them
    back, rounding once. Tensors already in the math dtype are used in place."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._pairs: list[tuple[list[Tensor], list[Tensor]]] = []

    def __call__(self, tensors: list[Tensor]) -> list[Tensor]:
        copies = _in_dtype(tensors, self.dtype)
        if copies is not tensors:
            self._pairs.append((tensors, copies))
        return copies

    def store(self) -> None:
        for stored, copies in self._pairs:
            torch._foreach_copy_(stored, copies)


def _masked(value: Number, ok: Number, otherwise: Number) -> Number:
    """`value` on a step that counts, `otherwise` on a skipped one. Exact: ok is 1 or 0."""
    return value * ok + otherwise * (1 - ok)


def _lerp_(start: list[Tensor], end: list[Tensor], weight: Number) -> None:
    # _foreach_lerp_ has no overload for one tensor weight: repeat it, one per tensor.
    torch._foreach_lerp_(start, end, [weight] * len(start) if isinstance(weight, Tensor) else weight)


def _add_scaled_(dst: list[Tensor], src: _Tensors, scale: Number) -> None:
    """dst += scale * src."""
    if isinstance(scale, Tensor):
        torch._foreach_add_(dst, torch._foreach_mul(src, scale))
    else:
        torch._foreach_add_(dst, src, alpha=scale)


def _assign_(dst: list[Tensor], src: list[Tensor], where: Number) -> None:
    """dst ← src where `where` is 1 (a float on the host path), unchanged where it is a tensor 0."""
    if isinstance(where, Tensor):
        _lerp_(dst, src, where)
    else:
        torch._foreach_copy_(dst, src)


def _dot(a: _Tensors, b: _Tensors) -> Tensor:
    """Σ a·b over every element of both lists, accumulated in fp64."""
    products = torch._foreach_mul(a, b)
    return torch.cat([p.reshape(-1) for p in products]).sum(dtype=torch.float64)


def _bias_correction(beta: float, step: Number) -> Number:
    """1 − β^step, as −expm1(step · ln β): exact to a few ulps even in fp32 with β close to 1.
    The step is taken as at least 1: a skipped step may meet a parameter that never stepped."""
    log_beta = math.log(beta) if beta > 0 else -math.inf
    if isinstance(step, Tensor):
        return -torch.expm1(step.clamp(min=1) * log_beta)
    return -math.expm1(max(step, 1.0) * log_beta)


# ---------------------------------------------------------------------------------------
# Inner optimizers: reference.sgd_update / adam_update over a bucket's list of tensors.
# ---------------------------------------------------------------------------------------


@dataclass
class _Used:
    """What adaptive α needs from the inner step of one bucket."""

    idx: list[int]  # the parameters that had a gradient
    grads: list[Tensor]  # the gradients the update used (unscaled, after maximize and L2 decay)
    bias_correction2_sqrt: list[Number]  # Adam only


def _inner_step(kind: str, c: _Context, group: dict[str, Any], grads: list[Tensor | None]) -> _Used | None:
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return None  # no inner update; the parameters still take part in the sync
    bucket = c.bucket
    math_copies = _MathCopies(c.md)
    params = math_copies([bucket.params[i] for i in idx])

    def state(key: str) -> list[Tensor]:
        return math_copies([bucket.views[i][key] for i in idx])

    wd = group["weight_decay"]
    decoupled = kind == "adamw"
    g = c.math_grads(
        cast("list[Tensor]", [grads[i] for i in idx]), modified=group["maximize"] or (wd != 0 and not decoupled)
    )
    if group["maximize"]:
        torch._foreach_neg_(g)
    bc2_sqrt: list[Number] = []
    if kind == "sgd":
        _sgd(c, group, idx, params, g, state)
    else:
        bc2_sqrt = _adam(c, group, idx, params, g, state, decoupled)
    math_copies.store()
    return _Used(idx, g, bc2_sqrt)


def _sgd(
    c: _Context,
    group: dict[str, Any],
    idx: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    state: Callable[[str], list[Tensor]],
) -> None:
    momentum, dampening, wd = group["momentum"], group["dampening"], group["weight_decay"]
    if wd != 0:
        torch._foreach_add_(grads, params, alpha=wd)
    update: _Tensors = grads
    if momentum != 0:
        buf = state("momentum_buffer")

        # buf ← a·buf + b·g with (a, b) = (0, 1) on a parameter's first step (torch.optim.SGD:
        # the first buffer is the gradient itself), (momentum, 1 − dampening) after it, and
        # (1, 0) on a skipped step. Each parameter has its own step count, hence per-parameter a, b.
        def later(s: Number) -> Number:  # 1 after a parameter's first step, else 0
            return (s != 0).to(s.dtype) if isinstance(s, Tensor) else float(s != 0)

        a = c.per_param(lambda s: _masked(momentum * later(s), c.ok, 1.0), idx)
        b = c.per_param(lambda s: (1 - dampening * later(s)) * c.ok, idx)
        torch._foreach_mul_(buf, a)  # type: ignore[arg-type]  # see Number
        torch._foreach_add_(buf, torch._foreach_mul(grads, b))  # type: ignore[arg-type]  # see Number
        update = torch._foreach_add(grads, buf, alpha=momentum) if group["nesterov"] else buf
    c.advance_steps(idx)
    _add_scaled_(params, update, -c.lr * c.ok)


def _adam(
    c: _Context,
    group: dict[str, Any],
    idx: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    state: Callable[[str], list[Tensor]],
    decoupled: bool,
) -> list[Number]:
    """Returns √(1 − β2^step) per parameter, which adaptive α needs too."""
    beta1, beta2 = group["betas"]
    wd, lr, ok = group["weight_decay"], c.lr, c.ok
    exp_avg, exp_avg_sq = state("exp_avg"), state("exp_avg_sq")
    c.advance_steps(idx)  # the bias corrections below use the new count, as torch.optim
    if wd != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * wd * ok)
        else:
            torch._foreach_add_(grads, params, alpha=wd)
            if c.skip is not False:
                torch._foreach_mul_(grads, ok)  # keep a skipped step's gradient at exactly 0
    _lerp_(exp_avg, grads, (1 - beta1) * ok)
    torch._foreach_mul_(exp_avg_sq, _masked(beta2, ok, 1.0))
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    second_moment = exp_avg_sq
    if group["amsgrad"]:
        # No mask needed: on a skipped step exp_avg_sq is unchanged and max_exp_avg_sq ≥ it.
        second_moment = state("max_exp_avg_sq")
        torch._foreach_maximum_(second_moment, exp_avg_sq)

    bc2_sqrt = c.per_param(lambda s: _bias_correction(beta2, s) ** 0.5, idx)
    neg_step_size = c.per_param(lambda s: -lr * ok / _bias_correction(beta1, s), idx)
    denom = torch._foreach_sqrt(second_moment)
    torch._foreach_div_(denom, bc2_sqrt)  # type: ignore[arg-type]  # see Number
    torch._foreach_add_(denom, group["eps"])
    # θ += m / (denom / −step_size), i.e. θ −= step_size · m / denom; step_size is 0 on a skipped step.
    torch._foreach_div_(denom, neg_step_size)  # type: ignore[arg-type]  # see Number
    torch._foreach_addcdiv_(params, exp_avg, denom)
    return bc2_sqrt


# ---------------------------------------------------------------------------------------
# Lookahead sync.
# ---------------------------------------------------------------------------------------


@dataclass
class _Syncing:
    c: _Context
    used: _Used | None
    sync: Number  # 1.0 (host path, a sync step) or the 0-dim 0/1 mask of the device path
    sync_bool: Literal[True] | Tensor
    params: list[Tensor]  # θ in the math dtype (bucket.params, or copies)
    slow_views: list[Tensor]  # φ as stored
    slow: list[Tensor]  # φ in the math dtype (slow_views, or copies)


def _sync_group(
    kind: str, group: dict[str, Any], syncing: list[tuple[_Context, _Used | None, Literal[True] | Tensor]]
) -> None:
    items = []
    for c, used, sync in syncing:
        bucket = c.bucket
        # θ as stored (rounded) by the inner step, as the reference reads it.
        slow_views = [v["slow_weights"] for v in bucket.views]
        mask = 1.0 if sync is True else sync.to(c.md)
        items.append(
            _Syncing(c, used, mask, sync, _in_dtype(bucket.params, c.md), slow_views, _in_dtype(slow_views, c.md))
        )

    alpha: Number = group["alpha"]
    if group.get("adaptive_alpha", False):
        alpha = _adaptive_alpha(group, items)
    for item in items:
        _sync_bucket(kind, group, item, alpha)


def _sync_bucket(kind: str, group: dict[str, Any], item: _Syncing, alpha: Number) -> None:
    c, bucket, sync = item.c, item.c.bucket, item.sync
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=bucket.device, dtype=c.md)

    _lerp_(item.slow, item.params, alpha * sync)  # φ ← φ + α (θ − φ), eq. 1; weight 0 off sync
    if item.slow is not item.slow_views:
        torch._foreach_copy_(item.slow_views, item.slow)
        torch._foreach_copy_(item.slow, item.slow_views)  # θ takes φ as stored (rounded)
    _assign_(item.params, item.slow, sync)  # θ ← φ
    if item.params is not bucket.params:
        torch._foreach_copy_(bucket.params, item.params)

    flat = bucket.flat
    if group["inner_state"] == "reset":
        for key in reference.RESET_KEYS:
            if key in flat:
                if item.sync_bool is True:
                    flat[key].zero_()
                else:
                    flat[key].masked_fill_(item.sync_bool, 0)
        if c.host_steps is not None:
            c.host_steps[:] = [0.0] * len(c.host_steps)
    elif group["inner_state"] == "pullback":
        key = reference.MOMENTUM_KEY[kind]
        if key in flat:
            math_copies = _MathCopies(c.md)
            m, cached = math_copies([flat[key], flat["cached_" + key]])
            m.lerp_(cached, (1 - alpha) * sync)  # m ← α m + (1 − α) m_cached
            _assign_([cached], [m], sync)  # m_cached ← m
            math_copies.store()


def _adaptive_alpha(group: dict[str, Any], items: list[_Syncing]) -> Number:
    """α̂ of paper §2.1 for the group, on the device (no host sync): 1 + gᵀd / dᵀÂd with
    d = θ0 − θk, clipped to [alpha_low, 1]; the group's α where dᵀÂd is 0 or not finite.
    Â and the gradient are those of reference.adaptive_alpha."""
    eps = group["eps"]
    key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
    g_dot_d: list[Tensor] = []
    d_a_d: list[Tensor] = []
    for item in items:
        used, c = item.used, item.c
        if used is None:
            continue  # the sums run over the parameters that have a gradient
        d = torch._foreach_sub([item.slow[i] for i in used.idx], [item.params[i] for i in used.idx])
        v = _in_dtype([c.bucket.views[i][key] for i in used.idx], c.md)
        curvature = torch._foreach_sqrt(v)  # Â = (√v̂ + ε) / lr
        torch._foreach_div_(curvature, used.bias_correction2_sqrt)  # type: ignore[arg-type]  # see Number
        torch._foreach_add_(curvature, eps)
        torch._foreach_div_(curvature, c.lr)
        torch._foreach_mul_(curvature, d)
        g_dot_d.append(_dot(used.grads, d))
        d_a_d.append(_dot(curvature, d))
    if not g_dot_d:
        return group["alpha"]
    device = items[0].c.bucket.device
    gd = torch.stack([t.to(device) for t in g_dot_d]).sum()
    dad = torch.stack([t.to(device) for t in d_a_d]).sum()
    alpha_hat = (1 + gd / dad).clamp(group["alpha_low"], 1.0)
    return torch.where((dad != 0) & dad.isfinite(), alpha_hat, group["alpha"])
