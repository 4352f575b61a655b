"""Lookahead around any torch.optim.Optimizer: the generic, unfused form.

    opt = Lookahead(torch.optim.RAdam(model.parameters(), lr=1e-3), k=5, alpha=0.5)

The inner optimizer does its own step, untouched; after it the wrapper counts and, every
k steps of a parameter group, syncs with one `torch._foreach_lerp_` and one
`torch._foreach_copy_` per (device, dtype): φ ← φ + α (θ − φ), θ ← φ (DESIGN §1). The
fused LookaheadSGD / LookaheadAdam / LookaheadAdamW do the same in one kernel pass; this
class is for every other inner optimizer (RAdam, Adagrad, NAdam, ...).

Where things live, and why:
    param_groups   the inner optimizer's own list, shared (a property), so that LR
                   schedulers, `add_param_group` and `load_state_dict` act on the groups
                   the inner optimizer reads. Each group also holds `k`, `alpha`,
                   `inner_state` (defaults from the constructor; set them per group in the
                   inner optimizer's groups or in `add_param_group`) and `lookahead_step`.
    lookahead_step the group's counter t, at run time a Python int in the group dict:
                   Algorithm 1 has one t per group, an int decides the sync without a
                   device-to-host read or a per-step kernel, and a group added later
                   starts its own count at 0.
    state          the inner optimizer's state (a property), so code that inspects
                   `optimizer.state` sees what it expects.
    slow weights   in a separate per-parameter dict, never in the inner state: torch.optim
                   initialises a parameter's state when `len(state[p]) == 0`, and an entry
                   put there before the first step would make Adam skip that. φ has the
                   parameter's dtype and device (fp32 for bf16/fp16 parameters, as in the
                   fused classes) and is taken from θ at the first step that sees the
                   parameter (Algorithm 1's φ ← θ, after any weight loading).

Checkpoints have the layout of the fused classes: `state_dict()` adds to each parameter's
inner state entry its `slow_weights`, its group's `lookahead_step` (an fp32 scalar, as
in LookaheadSGD/Adam/AdamW) and, under inner_state="pullback", `cached_<momentum>`;
`load_state_dict()` splits them off again before the inner optimizer sees the rest. So a
checkpoint of LookaheadAdam loads into Lookahead(torch.optim.Adam(...)) and back, it holds
only tensors, numbers and strings (`torch.load(weights_only=True)` reads it), and a resume
mid-cycle continues bit for bit. A checkpoint of the inner optimizer alone loads too: the
count restarts at 0 and φ at θ.

Hooks, as on any torch.optim optimizer: state_dict / load_state_dict pre and post hooks
registered on the wrapper run around the whole checkpoint (slow weights included), those on
the inner optimizer around its part. A wrapper step is one optimizer step: the global step
hooks (`torch.optim.optimizer.register_optimizer_step_pre_hook` / `_post_hook`) run once,
with the wrapper, and so do the wrapper's own; the inner step inside it runs the inner
optimizer's own hooks, with the inner optimizer, but not the global ones a second time. An
LR scheduler may be built on either.

GradScaler: the wrapper does not claim `_step_supports_amp_scaling`, so the scaler unscales
the gradients itself and calls `step()` only when they are finite: a skipped step does not
advance the lookahead counter.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._buckets import default_dtypes
from ._swap import swap_slow_weights
from .optimizers import _check_lookahead

__all__ = ["Lookahead"]

# The state entry interpolated under inner_state="pullback", per inner optimizer class
# (looked up along the MRO, so subclasses inherit it).
MOMENTUM_KEYS: dict[type[Optimizer], str] = {
    torch.optim.SGD: "momentum_buffer",
    torch.optim.Adam: "exp_avg",
    torch.optim.AdamW: "exp_avg",
    torch.optim.NAdam: "exp_avg",
    torch.optim.RAdam: "exp_avg",
    torch.optim.Adamax: "exp_avg",
}

_LOOKAHEAD_DEFAULTS = ("k", "alpha", "inner_state")
_SLOW = "slow_weights"
_COUNT = "lookahead_step"
_CACHED = "cached_"  # prefix of the pullback cache of the momentum entry
# Optimizer._group_tensors_by_device_and_dtype's argument and result as torch types them (entries
# may be None) and as this file uses them (lists of tensors, never None): cast from one to the other.
_TorchTensorLists = list[list[Tensor | None]]
_Grouped = dict[Any, tuple[list[list[Tensor]], list[int]]]


def _momentum_key(optimizer: Optimizer) -> str | None:
    for cls in type(optimizer).__mro__:
        if cls in MOMENTUM_KEYS:
            return MOMENTUM_KEYS[cls]
    return None


def _slow_dtype(param: Tensor) -> torch.dtype:
    """φ's dtype: the parameter's, fp32 for bf16/fp16 parameters (as in the fused classes)."""
    return default_dtypes(param.dtype, {})[1]


def _unique(params: list[Tensor]) -> list[Tensor]:
    """A group's parameters, each once (a tied weight listed twice syncs once)."""
    return list({id(p): p for p in params}.values())


class Lookahead(Optimizer):
    """Lookahead (Zhang et al. 2019, Algorithm 1) around any torch.optim.Optimizer.

    Args:
        optimizer: the inner optimizer; it keeps its parameters, groups and state.
        k: sync every k steps (per group; a group's own "k" wins).
        alpha: slow-weight step size, 0 < alpha <= 1 (per group likewise).
        inner_state: what happens to the inner state at a sync: "maintain" (the paper's
            choice), "reset" (the state of the group's parameters is dropped, so the inner
            optimizer starts it afresh at its next step), or "pullback" (the momentum is
            interpolated like the weights; needs an inner optimizer in MOMENTUM_KEYS).
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5, inner_state: str = "maintain") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {torch.typename(optimizer)}")
        self.optimizer = optimizer
        self._lookahead_state: dict[Tensor, dict[str, Tensor]] = {}
        self._in_slow_weights = False
        defaults = {**optimizer.defaults, "k": k, "alpha": alpha, "inner_state": inner_state}
        self._check(defaults)
        # Optimizer.__init__ would build param groups of its own; __setstate__ is the part
        # that makes a working Optimizer out of attributes (hook tables, step profiling).
        super().__setstate__({"defaults": defaults})
        for group in self.param_groups:
            self._init_group(group)

    # -- the inner optimizer's groups and state, shared -------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict[Tensor, Any]:
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> None:
        self.optimizer.state = value

    def __getstate__(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "defaults": self.defaults,
            "_lookahead_state": self._lookahead_state,
            "_in_slow_weights": False,
        }

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return f"{type(self).__name__} (\n    {inner}\n)"

    # -- groups ------------------------------------------------------------------------------

    def _check(self, group: dict[str, Any]) -> None:
        # The inner optimizer validated its own hyperparameters.
        _check_lookahead(group)
        if group["inner_state"] == "pullback" and _momentum_key(self.optimizer) is None:
            known = ", ".join(sorted(cls.__name__ for cls in MOMENTUM_KEYS))
            raise ValueError(
                f"Invalid inner_state: 'pullback' needs the momentum entry of the inner optimizer, "
                f"unknown for {type(self.optimizer).__name__} (known: {known})"
            )

    def _init_group(self, group: dict[str, Any]) -> None:
        """Give a group the lookahead defaults it lacks, check them, start its counter."""
        for key in _LOOKAHEAD_DEFAULTS:
            group.setdefault(key, self.defaults[key])
        self._check(group)
        group.setdefault(_COUNT, 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer, with this optimizer's k/alpha/inner_state
        unless it sets its own; its counter starts at 0 and its slow weights at its
        parameters' values at the next step."""
        # Checked before the inner optimizer sees the group, so a bad group adds nothing.
        self._check({**{key: self.defaults[key] for key in _LOOKAHEAD_DEFAULTS}, **param_group})
        self.optimizer.add_param_group(param_group)
        self.param_groups[-1][_COUNT] = 0
        self._init_group(self.param_groups[-1])

    # -- the step ------------------------------------------------------------------------------

    def step(self, closure: Any = None) -> Any:
        """The inner optimizer's step (it evaluates `closure`, whose loss is returned), then
        for each group t ← t + 1 and, when t % k == 0, the sync."""
        if self._in_slow_weights:
            raise RuntimeError("step() inside `with optimizer.slow_weights():` (the parameters hold the slow weights)")
        for group in self.param_groups:
            if _COUNT not in group:  # a group added through the inner optimizer
                self._init_group(group)
        self._init_slow_weights()
        loss = self._inner_step(closure)
        for group in self.param_groups:
            group[_COUNT] += 1
            if group[_COUNT] % group["k"] == 0:
                self._sync(group)
        return loss

    def _inner_step(self, closure: Any) -> Any:
        """`self.optimizer.step(closure)` as torch.optim's step wrapper (`profile_hook_step`)
        runs it, less the global hooks: they ran for this step already, with this optimizer,
        the one the user called. The inner optimizer's own pre hooks (one may replace the
        closure), its step, the profiler's record and its own post hooks run as in a plain
        `inner.step()`, with the inner optimizer."""
        inner = self.optimizer
        patched = vars(inner).get("step")
        if patched is not None:
            if not getattr(patched, "_wrapped_by_lr_sched", False):
                return patched(closure)  # someone else's wrapper is theirs to run, hooks and all
            # A scheduler built on the inner optimizer: what its wrapper records, so it does
            # not warn that its optimizer never stepped.
            inner._opt_called = True  # type: ignore[attr-defined]
        step = type(inner).step
        unhooked = getattr(step, "__wrapped__", None)
        if not getattr(step, "hooked", False) or unhooked is None:  # no hook wrapper to leave out
            return step(inner, closure)
        args: tuple[Any, ...] = (inner, closure)
        kwargs: dict[str, Any] = {}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
            for pre_hook in inner._optimizer_step_pre_hooks.values():
                result = pre_hook(inner, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{unhooked} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
                    args, kwargs = result
            loss = unhooked(*args, **kwargs)
            inner._optimizer_step_code()
            for post_hook in inner._optimizer_step_post_hooks.values():
                post_hook(inner, args, kwargs)
        return loss

    @torch.no_grad()
    def _init_slow_weights(self) -> None:
        """φ ← θ for the parameters this optimizer has not seen step yet."""
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._lookahead_state:
                    self._lookahead_state[p] = {_SLOW: p.detach().to(_slow_dtype(p), copy=True)}

    @torch.no_grad()
    def _sync(self, group: dict[str, Any]) -> None:
        """φ ← φ + α (θ − φ), θ ← φ for every parameter of the group (with a gradient in
        this step or not), then the inner-state policy."""
        alpha = group["alpha"]
        params = _unique(group["params"])
        if not params:
            return
        slows = [self._lookahead_state[p][_SLOW] for p in params]
        grouped = cast(_Grouped, self._group_tensors_by_device_and_dtype(cast(_TorchTensorLists, [params, slows])))
        for (fast, slow), _ in grouped.values():
            # φ has the parameter's dtype except for low-precision parameters (fp32 φ): the
            # lerp then reads θ in φ's dtype, and the copy rounds φ back once.
            fast_math = fast if fast[0].dtype == slow[0].dtype else [t.to(slow[0].dtype) for t in fast]
            torch._foreach_lerp_(slow, fast_math, alpha)
            torch._foreach_copy_(fast, slow)

        if group["inner_state"] == "reset":
            # torch.optim creates a parameter's state at its first step when there is none.
            for p in params:
                self.state.pop(p, None)
        elif group["inner_state"] == "pullback":
            self._pullback(params, alpha)

    def _pullback(self, params: list[Tensor], alpha: float) -> None:
        """m ← α m + (1 − α) m_cached, m_cached ← m, with m_cached starting at zero."""
        key = _momentum_key(self.optimizer)
        assert key is not None  # checked when the group was added
        moments, cached = [], []
        for p in params:
            m = self.state.get(p, {}).get(key)
            if m is None:
                continue  # no inner step yet: m = 0 = m_cached, nothing moves
            la = self._lookahead_state[p]
            c = la.get(_CACHED + key)
            if c is None:
                c = la[_CACHED + key] = torch.zeros_like(m)
            elif c.dtype != m.dtype or c.device != m.device:  # loaded from a fused-class checkpoint
                c = la[_CACHED + key] = c.to(m)
            moments.append(m)
            cached.append(c)
        if not moments:
            return
        grouped = cast(_Grouped, self._group_tensors_by_device_and_dtype(cast(_TorchTensorLists, [moments, cached])))
        for (ms, cs), _ in grouped.values():
            torch._foreach_mul_(ms, alpha)
            torch._foreach_add_(ms, cs, alpha=1 - alpha)
            torch._foreach_copy_(cs, ms)

    # -- slow weights, checkpoints ------------------------------------------------------------

    def slow_weights(self) -> contextlib.AbstractContextManager[None]:
        """`with optimizer.slow_weights(): evaluate(model)`: the parameters hold φ in the
        body, θ after it (see `lookahead_fused._swap.swap_slow_weights`). A parameter that
        has not stepped yet has φ = θ and is left alone."""
        pairs = (
            (p, self._lookahead_state[p][_SLOW])
            for group in self.param_groups
            for p in _unique(group["params"])
            if p in self._lookahead_state
        )
        return swap_slow_weights(self, pairs)

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with each parameter's `slow_weights`, its
        group's `lookahead_step` (moved from the group to the parameters, as in the fused
        classes) and pullback cache added to its state entry. The state-dict hooks
        registered on this optimizer run as torch.optim runs them: the pre hooks first, the
        post hooks on the whole result (one may return the state dict to give instead)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _state_dict(self) -> dict[str, Any]:
        state_dict = self.optimizer.state_dict()  # runs the inner optimizer's own hooks
        for packed, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            count = torch.tensor(float(packed.pop(_COUNT, 0)))
            for index, p in zip(packed["params"], group["params"], strict=True):
                if p in self._lookahead_state:
                    entry = state_dict["state"].setdefault(index, {})
                    entry.update(self._lookahead_state[p])
                    entry[_COUNT] = count.clone()
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class, of LookaheadSGD/Adam/AdamW (same layout), or of
        the inner optimizer alone (the count then restarts at 0, φ at θ at the next step).
        The load hooks registered on this optimizer run as torch.optim runs them: the pre
        hooks on a shallow copy of the whole checkpoint (one may return the state dict to
        load instead), the post hooks after everything is loaded."""
        state_dict = state_dict.copy()  # as torch.optim: a hook may change it in place
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner_state: dict[Any, dict[str, Any]] = {}
        lookahead_state: dict[Any, dict[str, Any]] = {}
        for index, entry in state_dict["state"].items():
            mine = {key: v for key, v in entry.items() if key in (_SLOW, _COUNT) or key.startswith(_CACHED)}
            lookahead_state[index] = mine
            rest = {key: v for key, v in entry.items() if key not in mine}
            if rest:  # a parameter the inner optimizer has no state for gets none
                inner_state[index] = rest
        self.optimizer.load_state_dict({**state_dict, "state": inner_state})  # with its own hooks

        self._lookahead_state = {}
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            group[_COUNT] = 0
            for index, p in zip(saved_group["params"], group["params"], strict=True):
                saved = dict(lookahead_state.get(index, {}))
                if _COUNT in saved:
                    group[_COUNT] = int(saved.pop(_COUNT))
                if _SLOW in saved:
                    self._lookahead_state[p] = {
                        key: v.to(device=p.device, dtype=_slow_dtype(p) if key == _SLOW else v.dtype, copy=True)
                        for key, v in saved.items()
                    }
            self._init_group(group)
