"""timm: the fused optimizers in timm's optimizer factory, and timm Lookahead checkpoints.

    from lookahead_fused.integrations import timm as lookahead_timm
    lookahead_timm.register()  # once, before the factory is asked
    optimizer = timm.optim.create_optimizer_v2(model, "fusedlookaheadadamw", lr=1e-3, weight_decay=0.05)

Names. timm's factory (`OptimizerRegistry.create_optimizer`, timm >= 1.0) splits the name at
"_": the last piece is looked up in the registry, and a first piece "lookahead" wraps the
result in timm's own, unfused `Lookahead`. So "lookahead_adamw" is torch's AdamW inside timm's
wrapper, and any name with an underscore is no use for a registration: "fused_lookahead_adamw"
would quietly build plain torch.optim.AdamW (its last piece, "adamw"), with no Lookahead at
all. The names here have none:

    fusedlookaheadadamw     LookaheadAdamW                      (in place of "lookahead_adamw")
    fusedlookaheadadam      LookaheadAdam                       ("lookahead_adam")
    fusedlookaheadsgd       LookaheadSGD, nesterov=True         ("lookahead_sgd", timm's "sgd")
    fusedlookaheadmomentum  LookaheadSGD, nesterov=False        ("lookahead_momentum")

Each defaults to timm's Lookahead settings, k=6 and alpha=0.5 (the classes' own default k is
5); the factory's keyword arguments (`--opt-kwargs k=5` in timm's train.py) override them.
Never put "lookahead_" before these names: timm would wrap the fused optimizer in its own
Lookahead, two Lookaheads in one. timm's `foreach=` is not accepted (the classes pick their
backend with `backend=`).

timm's train.py calls `optimizer.sync_lookahead()` after each epoch when the method exists,
then evaluates and saves the model: the fused classes have it (an out-of-schedule sync, as
timm's), so the model evaluated and saved holds the slow weights, as with timm's wrapper.

Checkpoints. timm's `Lookahead.state_dict()` (timm 0.5 to 1.x) is its inner optimizer's, with
the slow weights under "lookahead_slow_buff" in each parameter's state and the settings and
the counter in each group ("lookahead_alpha", "lookahead_k", "lookahead_step"). Loaded as it
is, the fused classes would keep their own k and alpha, start φ at θ and the count at 0, and
say nothing: `from_timm_state_dict` converts it first.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..optimizers import LookaheadAdam, LookaheadAdamW, LookaheadSGD

__all__ = ["NAMES", "register", "from_timm_state_dict"]

# timm's Lookahead(base_optimizer, alpha=0.5, k=6): what "lookahead_<name>" builds.
TIMM_LOOKAHEAD_DEFAULTS = {"k": 6, "alpha": 0.5}

# name: (class, description, OptimInfo fields, defaults besides k and alpha)
NAMES: dict[str, tuple[type, str, dict[str, Any], dict[str, Any]]] = {
    "fusedlookaheadadamw": (
        LookaheadAdamW,
        "lookahead_fused LookaheadAdamW: Lookahead and AdamW in one fused step",
        {"has_betas": True},
        {},
    ),
    "fusedlookaheadadam": (
        LookaheadAdam,
        "lookahead_fused LookaheadAdam: Lookahead and Adam in one fused step",
        {"has_betas": True},
        {},
    ),
    "fusedlookaheadsgd": (
        LookaheadSGD,
        "lookahead_fused LookaheadSGD: Lookahead and SGD with Nesterov momentum in one fused step",
        {"has_eps": False, "has_momentum": True},
        {"nesterov": True},
    ),
    "fusedlookaheadmomentum": (
        LookaheadSGD,
        "lookahead_fused LookaheadSGD: Lookahead and SGD with classical momentum in one fused step",
        {"has_eps": False, "has_momentum": True},
        {"nesterov": False},
    ),
}


def register(registry: Any = None) -> list[str]:
    """Register the fused classes with timm's optimizer registry (timm's `default_registry`,
    what `timm.optim.create_optimizer_v2` uses, unless another `OptimizerRegistry` is given)
    under the names in `NAMES`; returns them. Calling it again changes nothing."""
    try:
        factory = importlib.import_module("timm.optim._optim_factory")
    except ImportError as e:
        raise ImportError(f"register() needs timm >= 1.0 (its OptimizerRegistry): {e}") from e
    OptimInfo = factory.OptimInfo
    registry = factory.default_registry if registry is None else registry
    for name, (cls, description, fields, defaults) in NAMES.items():
        assert "_" not in name  # timm would parse it (see the module docstring)
        info = OptimInfo(
            name=name,
            opt_class=cls,
            description=description,
            defaults={**TIMM_LOOKAHEAD_DEFAULTS, **defaults},
            **fields,
        )
        if registry._optimizers.get(name) != info:  # timm warns when a name is registered again
            registry.register(info)
    return list(NAMES)


def from_timm_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A timm Lookahead checkpoint (`timm.optim.Lookahead(inner).state_dict()`, timm 0.5 to 1.x)
    in lookahead_fused's layout, for `load_state_dict` of LookaheadSGD/Adam/AdamW (inner
    torch.optim SGD/Adam/AdamW) or of `Lookahead(inner)` around any inner optimizer:

        lookahead_slow_buff  (per parameter)  ->  slow_weights            φ
        lookahead_step       (per group)      ->  lookahead_step of each of its parameters
        lookahead_k, lookahead_alpha          ->  the group's k and alpha

    The inner optimizer's state and settings pass through unchanged. timm gives a parameter
    its slow buffer at its first sync with a gradient; one without (a checkpoint taken
    before the first sync) gets φ = its current value at the load, which is where timm
    would start it too, only at the next sync. A new dict is returned; tensors are shared.

    Raises ValueError for what is not a timm Lookahead checkpoint, and for one of timm < 0.5,
    whose slow buffers ("slow_state") are keyed by the id() of each parameter tensor in the
    process that saved it: nothing in the file says which parameter each belongs to (timm's
    own load dropped them). Convert it without them, knowingly, as
    `from_timm_state_dict({k: v for k, v in sd.items() if k != "slow_state"})`: φ then
    starts at θ, the counter and the settings are kept."""
    if "slow_state" in state_dict:
        raise ValueError(
            "a checkpoint of timm < 0.5's Lookahead: its 'slow_state' is keyed by the id() of each parameter "
            "tensor in the saving process, so its slow weights cannot be matched to parameters. Drop the key "
            "to convert the rest ({k: v for k, v in sd.items() if k != 'slow_state'}): the slow weights then "
            "restart at the parameters' values"
        )
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not any("lookahead_k" in g for g in groups):
        raise ValueError(
            "not a timm Lookahead checkpoint: no param group has 'lookahead_k' "
            "(a lookahead_fused or torch.optim checkpoint loads with load_state_dict as it is)"
        )
    state = {index: dict(entry) for index, entry in state_dict["state"].items()}
    for entry in state.values():
        slow = entry.pop("lookahead_slow_buff", None)
        if slow is not None:
            entry["slow_weights"] = slow
    converted_groups = []
    for group in groups:
        group = dict(group)
        count = group.pop("lookahead_step", 0)
        k, alpha = group.pop("lookahead_k", None), group.pop("lookahead_alpha", None)
        if k is not None:
            group["k"] = int(k)
        if alpha is not None:
            group["alpha"] = float(alpha)
        for index in group["params"]:
            state.setdefault(index, {})["lookahead_step"] = torch.tensor(float(count))
        converted_groups.append(group)
    return {**state_dict, "state": state, "param_groups": converted_groups}
