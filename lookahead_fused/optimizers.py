"""LookaheadSGD, LookaheadAdam, LookaheadAdamW: torch.optim front-ends over the backends.

The classes validate hyperparameters, group parameters into buckets (param group, device,
dtype) with flat state, and hand each group to one backend's step function. Everything
numeric happens in the backend; the semantics are those of `lookahead_fused.reference`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _ops, backends
from ._buckets import COUNTER_KEYS, Bucket, build_buckets, is_sharded
from ._swap import swap_slow_weights

INNER_STATES = ("maintain", "reset", "pullback")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Stepped as their real views (torch.view_as_real), as torch.optim steps them: float32 and
# float64 parts. (complex32 has no real view torch.optim steps.)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _check_lookahead(group: dict[str, Any]) -> None:
    """Validate the Lookahead settings of a group (also used by the generic wrapper)."""
    k = group["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (a positive int)")
    alpha = group["alpha"]
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"Invalid alpha: {alpha} (0 < alpha <= 1)")
    if group["inner_state"] not in INNER_STATES:
        raise ValueError(
            f"Invalid inner_state: {group['inner_state']!r} (choose from {', '.join(map(repr, INNER_STATES))})"
        )


def _check_group_common(group: dict[str, Any]) -> None:
    """Validate the settings every fused class shares: Lookahead's, lr, weight decay, dtypes."""
    _check_lookahead(group)
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    for key in ("state_dtype", "slow_dtype"):
        if group.get(key) is not None and group[key] not in _FLOAT_DTYPES:
            raise ValueError(f"Invalid {key}: {group[key]} (a floating dtype: float32, float64, bfloat16, float16)")


def _refuse_sharded_adaptive_alpha(who: str, index: int) -> None:
    """Refuse adaptive alpha for a group with sharded parameters (DTensors, as FSDP2's
    `fully_shard` makes them). α̂ comes from two dot products over every element of the group
    (reference.adaptive_alpha), but the buckets work on each rank's local shards with no
    communication: each rank would compute its own α̂ from its own shards, so the ranks' slow
    weights would drift apart from one process's run (measured: 8.1e-3 after 6 steps on two
    ranks). Summing the two dot products over the mesh (an all-reduce at every sync) would be
    the real fix, but it is not done here: it puts a collective inside step(), which then blocks
    unless every rank steps every group together, and each backend forms the sums in its own
    device reduction (the CUDA kernel's two stages, Triton's, the C++ backend's), which would
    each need a hook between the reduction and the sync. Refused, the combination cannot
    silently train something other than the single-process optimizer."""
    raise ValueError(
        f"{who}: adaptive_alpha=True is not supported with sharded (DTensor) parameters, as FSDP2's "
        f"fully_shard makes them (param group {index}): each rank holds only its shards, so each would "
        "compute its own adaptive alpha from part of the group. Use adaptive_alpha=False (a fixed alpha) "
        "for sharded parameters"
    )


# What has been said once per process (fallback warnings, the pointer to the GPU check).
_TOLD: set[tuple] = set()


def _tell_once(key: tuple, message: str) -> None:
    if key not in _TOLD:
        _TOLD.add(key)
        warnings.warn(message, UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel of the first frame outside lookahead_fused and torch: the user's line
    that built or stepped the optimizer, whatever wrappers (torch.optim's hooks) lie between."""
    frame: FrameType | None
    frame, level = sys._getframe(2), 2  # the caller of warnings.warn's caller
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _note_resolution(who: str, requested: str, resolved: str, devices: set[torch.device]) -> None:
    """Say once when "auto" (or a keyword-narrowed request) settles on another backend than
    the fastest one for the device (cuda -> triton -> foreach, cpu -> foreach), and why; and,
    the first time a GPU backend is used, where the check of its kernels is."""
    if requested.startswith("auto"):
        for preferred in backends.preferred(requested, devices):
            if preferred == resolved:
                break
            why = "; ".join(filter(None, (backends.unavailable(preferred, d) for d in devices)))
            _tell_once(
                ("fallback", requested, preferred, resolved),
                f"{who}: backend {preferred!r} cannot run here ({why}); using {resolved!r} "
                "(opt.backend_report() shows who steps what)",
            )
            break
    if resolved in ("cuda", "triton"):
        _tell_once(
            ("gpu", resolved),
            f"{who}: the {resolved} backend's kernels have been verified on the CPU only (emulation, "
            "interpreter); run `python -m lookahead_fused check --device cuda` on this GPU before a long run",
        )


class _LookaheadOptimizer(Optimizer):
    """Shared machinery. Subclasses set `_kind` and validate their own hyperparameters."""

    _kind: str  # "sgd" | "adam" | "adamw": which inner update the backends apply
    # GradScaler's contract (as torch's fused optimizers): it hands us grad_scale and found_inf
    # as device tensors instead of unscaling and syncing itself. A class attribute, so that
    # copies and unpickled optimizers keep it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        backend: str,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                f"{type(self).__name__} does not support differentiable=True: the fused step records no "
                "autograd graph (use torch.optim's optimizer with differentiable=True for that)"
            )
        # backend= and torch.optim's fused= / foreach= (backends.from_keywords); an unknown name
        # or contradicting keywords fail before anything else.
        backend = backends.from_keywords(backend, foreach, fused)
        self._backend_request = backend
        self._group_buckets: list[list[Bucket] | None] = []
        self._group_members: list[tuple[int, ...] | None] = []  # ids of each group's params at build
        self._in_slow_weights = False
        super().__init__(params, defaults)
        self._backend = backends.resolve(backend, self._devices())
        _note_resolution(type(self).__name__, backend, self._backend, self._devices())

    # -- torch.optim plumbing ------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group_common(group)
            self._check_group(group)
            for p in group["params"]:
                if p.dtype not in _FLOAT_DTYPES and p.dtype not in _COMPLEX_DTYPES:
                    raise ValueError(
                        f"{type(self).__name__} supports floating-point and complex parameters only, got {p.dtype}"
                    )
                if p.is_complex() and any(
                    group.get(key) not in (None, p.dtype.to_real()) for key in ("state_dtype", "slow_dtype")
                ):
                    raise ValueError(
                        f"{type(self).__name__}: a {p.dtype} parameter keeps its state and slow weights in "
                        f"{p.dtype.to_real()} (its real view, as torch.optim steps it); state_dtype/slow_dtype "
                        f"{group.get('state_dtype')}/{group.get('slow_dtype')} cannot hold them"
                    )
                if p.layout != torch.strided:  # the state is flat, dense buffers beside p
                    raise ValueError(f"{type(self).__name__} supports dense parameters only, got layout {p.layout}")
            if group.get("adaptive_alpha", False) and any(map(is_sharded, group["params"])):
                _refuse_sharded_adaptive_alpha(type(self).__name__, len(self.param_groups) - 1)
            if hasattr(self, "_backend"):  # a group added after construction may bring a new device
                self._backend = backends.resolve(self._backend_request, self._devices())
        except (ValueError, RuntimeError):
            self.param_groups.pop()  # a rejected group must not stay behind to be stepped
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backend_request"] = self._backend_request
        state["_backend"] = self._backend
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Buckets are rebuilt from the per-parameter state at the next step.
        self._group_buckets, self._group_members = [], []
        self._in_slow_weights = False

    @property
    def backend(self) -> str:
        """The backend the optimizer runs ("eager", "foreach", ...); a group it cannot step
        with its kernels is routed to another (`backend_report()`)."""
        return self._backend

    def backend_report(self) -> list[dict[str, Any]]:
        """Who steps what: one row per bucket (param group × device × dtype) with the group
        index, device, dtype, tensors, elements, the backend requested and the one that really
        stepped it at the last step, and why when that is not the optimizer's backend (a dtype
        or layout its kernels do not cover). A group not stepped yet has no buckets: its rows
        come from its parameters, with reason "not stepped yet"."""
        rows = []
        for index, group in enumerate(self.param_groups):
            buckets = self._group_buckets[index] if index < len(self._group_buckets) else None
            if buckets is None:
                by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
                for p in group["params"]:
                    by_key.setdefault((p.device, p.dtype), []).append(p)
                for (device, dtype), ps in by_key.items():
                    rows.append(self._report_row(index, device, dtype, ps, None, "not stepped yet"))
                continue
            for b in buckets:
                stepped, why = b.stepped_by or (self._backend, None)
                rows.append(self._report_row(index, b.device, b.dtype, b.params, stepped, why))
        return rows

    def _report_row(self, index: int, device: torch.device, dtype: torch.dtype, params: list[Tensor],
                    stepped: str | None, why: str | None) -> dict[str, Any]:  # fmt: skip
        return {
            "group": index, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "tensors": len(params), "elements": sum(p.numel() for p in params),
            "requested": self._backend_request, "backend": stepped or self._backend, "reason": why,
        }  # fmt: skip

    def __repr__(self) -> str:
        lines = super().__repr__().splitlines()
        rows = self.backend_report()
        routed = [r for r in rows if r["backend"] != self._backend]
        text = f"Backend: {self._backend}" + (
            f" (requested {self._backend_request})" if self._backend_request != self._backend else ""
        )
        lines.insert(1, text)
        for r in routed:
            lines.insert(2, f"  group {r['group']} {r['dtype']} on {r['device']}: {r['backend']} ({r['reason']})")
        return "\n".join(lines)

    def _warn_routed(self, buckets: list[Bucket], group: dict[str, Any]) -> None:
        """Once per process and cause: a group stepped by another backend than the optimizer's."""
        for b in buckets:
            if b.stepped_by is not None and b.stepped_by[0] != self._backend:
                stepped, why = b.stepped_by
                index = next(i for i, g in enumerate(self.param_groups) if g is group)
                _tell_once(
                    ("routed", self._backend, stepped, why),
                    f"{type(self).__name__}: param group {index} ({b.dtype} on {b.device}) is stepped by "
                    f"{stepped!r}, not {self._backend!r}: {why}",
                )

    def _devices(self) -> set[torch.device]:
        return {p.device for g in self.param_groups for p in g["params"]}

    def _buckets(self, index: int, members: tuple[int, ...] | None = None) -> list[Bucket]:
        """The buckets of param group `index`, (re)built when the group changed: new
        parameters, a parameter whose dtype or device changed, state loaded from a checkpoint.
        `members`: the ids of the group's parameters, when the caller has them already."""
        while len(self._group_buckets) < len(self.param_groups):
            self._group_buckets.append(None)
            self._group_members.append(None)
        group = self.param_groups[index]
        # The buckets hold their parameters, so equal ids mean the very same tensors.
        if members is None:
            members = tuple(map(id, group["params"]))
        buckets = self._group_buckets[index]
        if buckets is not None and self._group_members[index] == members and not any(b.moved() for b in buckets):
            return buckets
        buckets = build_buckets(self._kind, group, self.state)
        for b in buckets:
            b.moved()  # records the layout the bucket was built for
        self._group_buckets[index], self._group_members[index] = buckets, members
        self._backend = backends.resolve(self._backend_request, self._devices())
        return buckets

    def _has_sharded(self, index: int, members: tuple[int, ...]) -> bool:
        """Whether param group `index` holds a sharded (DTensor) parameter: read from its
        buckets while they were built for these very parameters (a tensor never changes class),
        else by looking at every parameter."""
        if index < len(self._group_buckets) and self._group_members[index] == members:
            buckets = self._group_buckets[index]
            if buckets is not None:
                return any(b.sharded for b in buckets)
        return any(map(is_sharded, self.param_groups[index]["params"]))

    def _init_group(self) -> str:
        """Dynamo's hook for an optimizer's lazy state: a compiled `step()` calls it, and Dynamo
        runs it eagerly at trace time instead of tracing it. Builds every group's buckets and
        returns the plan of the compiled step (`lookahead_fused._ops.plan`)."""
        return _ops.plan(self)

    # -- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Lookahead step: the inner update, and on every k-th step the sync."""
        if self._in_slow_weights:
            raise RuntimeError("step() inside `with optimizer.slow_weights():` (the parameters hold the slow weights)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_lookahead(group)  # k, alpha or inner_state may have been edited in param_groups
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            # torch.compile: the whole step is one custom op (lookahead_fused._ops), because
            # the checks and tables below read tensor addresses, which Dynamo cannot trace.
            _ops.traced_step(self, grad_scale, found_inf)
            return loss
        who = type(self).__name__
        # The settings of every group are checked before any state is built or anything is
        # updated (adaptive_alpha may have been switched on in param_groups). Under
        # torch.compile, `_ops.plan` refuses sharded parameters altogether.
        members = [tuple(map(id, group["params"])) for group in self.param_groups]
        for index, group in enumerate(self.param_groups):
            if group.get("adaptive_alpha", False) and self._has_sharded(index, members[index]):
                _refuse_sharded_adaptive_alpha(who, index)
        # Every gradient of every group is checked before anything is updated: a bad gradient
        # in the last group must not leave the first ones stepped.
        work = []
        for index, group in enumerate(self.param_groups):
            if group["params"]:
                buckets = self._buckets(index, members[index])
                work.append((group, buckets, [b.grads(who) for b in buckets]))
        step_group = backends.get(self._backend).step
        for group, buckets, grads in work:
            step_group(self._kind, group, buckets, grads, grad_scale, found_inf)
        for group, buckets, _ in work:
            self._warn_routed(buckets, group)
        return loss

    # -- state ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class, or of the matching torch.optim optimizer (the
        slow weights then start from the current parameters). State keeps its saved dtype
        (torch.optim would cast it to the parameter's dtype, losing fp32 state of bf16 models)."""
        saved_state = state_dict["state"]
        self._check_state_shapes(state_dict)
        # A torch.optim checkpoint has no k, alpha, inner_state, ...: those keep their values.
        current = [{key: v for key, v in g.items() if key != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, settings in zip(self.param_groups, current):
            for key, value in settings.items():
                group.setdefault(key, value)
        id_map: dict[int, Tensor] = {}
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            id_map.update(zip(saved_group["params"], group["params"]))
        for pid, values in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                continue
            self.state[p] = {
                key: (v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v)
                for key, v in values.items()
                if v is not None
            }
        for group in self.param_groups:
            _check_group_common(group)
            self._check_group(group)
        self._group_buckets, self._group_members = [], []  # rebuilt, and the loaded state copied in, at the next step

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything is replaced, a checkpoint whose per-parameter state does not
        fit the parameters it maps to (a model of other shapes): otherwise the load succeeds
        and the next step() fails with the optimizer's own state already overwritten. Groups
        of other counts are left to torch.optim's check, whose message is the expected one."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return
        for saved_group, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(pid, {}).items():
                    if key not in COUNTER_KEYS and isinstance(value, Tensor) and value.numel() != p.numel():
                        raise ValueError(
                            f"loaded state '{key}' has {value.numel()} elements for a parameter of shape "
                            f"{tuple(p.shape)} (a checkpoint of another model?)"
                        )

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Put the slow weights φ into the parameters for the body of the `with`, then put the
        fast weights back (see `lookahead_fused._swap.swap_slow_weights`). A group that has
        not stepped yet has no buckets and needs no swap: φ = θ."""
        pairs = (
            (p, self.state[p]["slow_weights"])
            for index, group in enumerate(self.param_groups)
            if group["params"] and any(p in self.state for p in group["params"])
            for b in self._buckets(index)
            for p in b.owners or b.params
        )
        with swap_slow_weights(self, pairs):
            yield

    @torch.no_grad()
    def sync_lookahead(self) -> None:
        """A sync now, out of schedule, as timm's `Lookahead.sync_lookahead` (which timm's
        train.py calls after each epoch, before evaluating and saving): for every parameter
        that has stepped, φ ← φ + α (θ − φ), θ ← φ, then the group's inner_state policy
        (`reference.lookahead_sync`). Afterwards the parameters hold the new φ, so the model
        evaluates and saves the slow weights, and training goes on from there. The counter is
        left alone, as in timm: the next scheduled sync stays at the next multiple of k. A
        group with adaptive_alpha uses its fixed alpha (α̂ needs the last step's gradients).
        To evaluate φ without changing the run, use `slow_weights()` instead."""
        if self._in_slow_weights:
            raise RuntimeError("sync_lookahead() inside `with optimizer.slow_weights():`")
        from .reference import lookahead_sync

        for index, group in enumerate(self.param_groups):
            if not group["params"] or not any(p in self.state for p in group["params"]):
                continue  # nothing stepped: φ = θ
            _check_lookahead(group)
            for b in self._buckets(index):
                for p in b.owners or b.params:
                    lookahead_sync(
                        p, self.state[p], alpha=group["alpha"], inner_state=group["inner_state"], optimizer=self._kind
                    )
                b.host_count = None  # state moved outside a backend (reset zeroes `step`): re-read it


class LookaheadSGD(_LookaheadOptimizer):
    """Lookahead around torch.optim.SGD, fused: `step()` does the SGD update and, every k
    steps, φ ← φ + α(θ − φ), θ ← φ. See `lookahead_fused.reference` for the exact math."""

    _kind = "sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        k: int = 5,
        alpha: float = 0.5,
        inner_state: str = "maintain",
        state_dtype: torch.dtype | None = None,
        slow_dtype: torch.dtype | None = None,
        capturable: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, k=k, alpha=alpha, inner_state=inner_state,
            state_dtype=state_dtype, slow_dtype=slow_dtype, capturable=capturable,
        )  # fmt: skip
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, differentiable=differentiable)

    def _check_group(self, group: dict[str, Any]) -> None:
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if not 0.0 <= group["dampening"]:
            raise ValueError(f"Invalid dampening value: {group['dampening']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class LookaheadAdam(_LookaheadOptimizer):
    """Lookahead around torch.optim.Adam (L2 weight decay), fused: `step()` does the Adam
    update and, every k steps, the sync. `adaptive_alpha=True` picks α per group at each
    sync (paper §2.1), clipped to [alpha_low, 1]. See `lookahead_fused.reference`."""

    _kind = "adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        k: int = 5,
        alpha: float = 0.5,
        inner_state: str = "maintain",
        adaptive_alpha: bool = False,
        alpha_low: float = 0.1,
        state_dtype: torch.dtype | None = None,
        slow_dtype: torch.dtype | None = None,
        capturable: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if decoupled_weight_decay:  # torch.optim.Adam(decoupled_weight_decay=True) is AdamW
            self._kind = "adamw"
        elif self._kind == "adamw":
            raise ValueError(
                f"{type(self).__name__}'s weight decay is always decoupled; use LookaheadAdam for L2 weight decay"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, k=k, alpha=alpha, inner_state=inner_state,
            adaptive_alpha=adaptive_alpha, alpha_low=alpha_low, state_dtype=state_dtype,
            slow_dtype=slow_dtype, capturable=capturable,
        )  # fmt: skip
        super().__init__(params, defaults, backend, foreach=foreach, fused=fused, differentiable=differentiable)

    def _check_group(self, group: dict[str, Any]) -> None:
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 < group["alpha_low"] <= 1.0:
            raise ValueError(f"Invalid alpha_low: {group['alpha_low']} (0 < alpha_low <= 1)")


class LookaheadAdamW(LookaheadAdam):
    """LookaheadAdam with decoupled weight decay (torch.optim.AdamW), default 1e-2."""

    _kind = "adamw"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
