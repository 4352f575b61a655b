"""What the benchmark times: one optimizer step of each contender, per inner optimizer.

For each family (Adam; SGD with momentum 0.9): the fused Lookahead class on every backend
that is a speed path on the device, the generic `lookahead_fused.Lookahead` around torch's
fused optimizer, timm's Lookahead around the same (when timm imports), and torch's own
optimizer without Lookahead (fused, foreach, default) as the floor to compare with.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import lookahead_fused
from lookahead_fused import backends

K = 5  # Lookahead's k for every contender: a timed cycle is k steps, one of them a sync
ALPHA = 0.5

# Minimum memory traffic per fp32 parameter and step (DESIGN §4), each byte read or written
# once. Adam: read θ g m v, write θ m v; SGD with momentum: read θ g b, write θ b. A sync
# step adds reading and writing the slow weights φ.
PLAIN_BYTES = {"adam": 28, "sgd": 20}
SYNC_EXTRA_BYTES = 8

# Backends that run on a device type only as a correctness tool, not as a speed path there.
_NOT_TIMED = {"cpu": {"triton": "Triton interpreter: a correctness tool", "cuda_emulated": "host emulation of CUDA"}}


@dataclass(frozen=True)
class Family:
    name: str  # "adam" | "sgd": the key of PLAIN_BYTES
    torch_class: type[Optimizer]
    lookahead_class: type[Optimizer]  # lookahead_fused's fused class
    hyper: dict[str, Any] = field(hash=False)  # what every contender of the family is built with


FAMILIES = (
    Family("adam", torch.optim.Adam, lookahead_fused.LookaheadAdam, {"lr": 1e-3}),
    Family("sgd", torch.optim.SGD, lookahead_fused.LookaheadSGD, {"lr": 1e-2, "momentum": 0.9}),
)

Build = Callable[[list[Tensor]], Optimizer]


@dataclass(frozen=True)
class Contender:
    name: str
    family: Family
    lookahead: bool  # whether a step includes Lookahead (a sync every K steps)
    build: Build | None  # None when it cannot run here
    unavailable: str | None = None  # why not
    baseline: bool = False  # torch's fused optimizer: the row the others of the family are compared with
    floor: bool = False  # the streaming kernel with the fused Lookahead step's accesses

    @property
    def bytes_per_param(self) -> float:
        """Minimum traffic per parameter and step, amortised over a k-cycle for Lookahead:
        (k - 1) plain steps and one sync step."""
        return PLAIN_BYTES[self.family.name] + (SYNC_EXTRA_BYTES / K if self.lookahead else 0)


def _timm_lookahead() -> tuple[type[Optimizer] | None, str | None]:
    try:
        return importlib.import_module("timm.optim").Lookahead, None
    except ImportError as e:  # optional: timm (and the torchvision it imports) may be absent
        return None, f"timm not importable ({e})"


def _family_contenders(family: Family, device: torch.device) -> list[Contender]:
    inner = family.torch_class.__name__

    def torch_opt(params: list[Tensor], **impl: bool) -> Optimizer:
        return family.torch_class(params, **family.hyper, **impl)

    out = []
    for backend in backends.NAMES:
        why = _NOT_TIMED.get(device.type, {}).get(backend) or backends.unavailable(backend, device)

        def fused(params: list[Tensor], backend: str = backend) -> Optimizer:
            return family.lookahead_class(params, **family.hyper, k=K, alpha=ALPHA, backend=backend)

        out.append(
            Contender(
                f"{family.lookahead_class.__name__}(backend={backend})", family, True, None if why else fused, why
            )
        )

    out.append(_floor_contender(family, device))

    def wrapper(params: list[Tensor]) -> Optimizer:
        return lookahead_fused.Lookahead(torch_opt(params, fused=True), k=K, alpha=ALPHA)

    out.append(Contender(f"lookahead_fused.Lookahead({inner} fused)", family, True, wrapper))
    timm_lookahead, why = _timm_lookahead()

    def timm(params: list[Tensor]) -> Optimizer:
        return timm_lookahead(torch_opt(params, fused=True), k=K, alpha=ALPHA)

    out.append(Contender(f"timm Lookahead({inner} fused)", family, True, None if why else timm, why))
    for impl in ("fused", "foreach"):
        out.append(
            Contender(
                f"torch {inner}({impl}=True)",
                family,
                False,
                lambda params, impl=impl: torch_opt(params, **{impl: True}),
                baseline=impl == "fused",
            )
        )
    out.append(Contender(f"torch {inner}(default)", family, False, torch_opt))
    return out


def _floor_contender(family: Family, device: torch.device) -> Contender:
    """The bandwidth floor of a Lookahead step (k − 1 plain passes and a sync pass), measured
    by a streaming kernel of _C: on the CPU only (on a GPU the ratio is to the modelled floor)."""
    name = "floor: stream kernel, same bytes"
    if device.type != "cpu":
        return Contender(name, family, True, None, "measured on the CPU only", floor=True)
    try:
        from .cpu_floor import FloorCycle
    except ImportError as e:
        return Contender(name, family, True, None, f"_C not importable ({e})", floor=True)

    def floor(params: list[Tensor]) -> Any:
        return FloorCycle(sum(p.numel() for p in params), family.name, K, lookahead=True)

    return Contender(name, family, True, floor, floor=True)


def contenders(device: torch.device, families: tuple[str, ...] = ("adam", "sgd")) -> list[Contender]:
    """Every contender of the given families, available here or not, in table order."""
    return [c for family in FAMILIES if family.name in families for c in _family_contenders(family, device)]
