"""The one place that maps a backend name to the function that steps a parameter group.

A backend is a module with two functions:

    unavailable(device: torch.device) -> str | None
        why the backend cannot run on this device, or None when it can;
    step(kind, group, buckets, grads, grad_scale, found_inf) -> None
        one Lookahead step of one parameter group: the inner update of every bucket
        (kind is "sgd", "adam" or "adamw"), the counters, and the sync on sync steps.
        grads[i] is the list of gradients of buckets[i] (None where a parameter has none),
        already checked by the front-end. grad_scale / found_inf follow GradScaler's contract.

`backend="auto"` takes the first usable name of AUTO_ORDER for the parameters' device type.
torch.optim's `fused=` and `foreach=` keywords narrow that choice (`from_keywords`): the
requests "auto:fused" (a compiled backend only), "auto:unfused" (foreach, then eager) and
"auto:no-foreach" (anything but foreach).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module implementing it. Later backends ("cpu", "triton", "cuda", "cuda_emulated")
# register here and nowhere else.
_MODULES = {
    "eager": "lookahead_fused.backends.eager",
    "foreach": "lookahead_fused.backends.foreach",
    "cpu": "lookahead_fused.backends.cpu",
    "triton": "lookahead_fused.backends.triton",
    "cuda": "lookahead_fused.backends.cuda",
    "cuda_emulated": "lookahead_fused.backends.cuda_emulated",
}

# What "auto" prefers, fastest first, per device type; "foreach" runs anywhere.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "foreach"),
    "cpu": ("cpu", "foreach"),
}
_AUTO_FALLBACK = ("foreach",)

NAMES = tuple(_MODULES)
# The backends whose step is a compiled kernel (what torch.optim calls "fused").
COMPILED = ("cuda", "triton", "cpu")
# "auto" narrowed by torch.optim's keywords: request -> the names it may pick.
_NARROWED = {
    "auto:fused": COMPILED,
    "auto:unfused": ("foreach", "eager"),
    "auto:no-foreach": ("cuda", "triton", "cpu", "eager"),
}


def from_keywords(backend: str, foreach: bool | None, fused: bool | None) -> str:
    """The backend request for torch.optim's `foreach=` / `fused=` keywords next to ours:
    fused=True: a compiled backend (cpu, cuda or triton) or an error; foreach=True: "foreach";
    False: anything but those; None: no constraint. With an explicit backend the keywords
    must agree with it."""
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    if backend != "auto":
        get(backend)
        clashes = (
            (fused is True and backend not in COMPILED)
            or (fused is False and backend in COMPILED)
            or (foreach is True and backend != "foreach")
            or (foreach is False and backend == "foreach")
        )
        if clashes:
            raise ValueError(f"backend={backend!r} contradicts foreach={foreach}, fused={fused}")
        return backend
    if fused:
        return "auto:fused"
    if foreach:
        return "foreach"
    if fused is False:
        return "eager" if foreach is False else "auto:unfused"
    if foreach is False:
        return "auto:no-foreach"
    return "auto"


def get(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"Invalid backend: {name!r} (choose from 'auto', {', '.join(map(repr, NAMES))})")
    return importlib.import_module(_MODULES[name])


def unavailable(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    if name not in _MODULES:
        return "not part of this build"
    try:
        return get(name).unavailable(device)
    except ImportError as e:  # a backend whose dependencies are missing is simply unavailable
        return f"import failed: {e}"


def resolve(requested: str, devices: set[torch.device]) -> str:
    """The backend to use for parameters on `devices`: the requested one after checking it
    can run there, or the fastest usable one for "auto"."""
    if requested in _NARROWED:
        return _resolve_among(requested, _NARROWED[requested], devices)
    if requested != "auto":
        get(requested)  # unknown names fail here with the list of valid ones
        for device in devices:
            why = unavailable(requested, device)
            if why is not None:
                raise RuntimeError(f"backend {requested!r} cannot run on {device}: {why}")
        return requested
    for name in preferred("auto", devices):
        if all(unavailable(name, d) is None for d in devices):
            return name
    raise RuntimeError(f"no backend can run on {sorted(map(str, devices))}")


def _resolve_among(requested: str, names: tuple[str, ...], devices: set[torch.device]) -> str:
    """The first of AUTO_ORDER (then eager) that is in `names` and runs on every device."""
    candidates = preferred(requested, devices)
    for name in candidates:
        if all(unavailable(name, d) is None for d in devices):
            return name
    why = "; ".join(f"{n} on {d}: {unavailable(n, d)}" for n in candidates for d in devices if unavailable(n, d))
    keyword = {"auto:fused": "fused=True", "auto:unfused": "fused=False", "auto:no-foreach": "foreach=False"}[requested]
    raise RuntimeError(f"{keyword}: no backend among {', '.join(names)} can run here ({why or 'none applies'})")


def preferred(requested: str, devices: set[torch.device]) -> tuple[str, ...]:
    """The backends a request would take in order of preference, usable or not."""
    device_types = {d.type for d in devices} or {"cpu"}
    order = AUTO_ORDER.get(next(iter(device_types)), _AUTO_FALLBACK) if len(device_types) == 1 else _AUTO_FALLBACK
    if requested in _NARROWED:
        return tuple(n for n in (*order, "eager") if n in _NARROWED[requested])
    return order
