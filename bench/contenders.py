"""What the benchmark times: one optimizer step of each contender, per inner optimizer.

For each family (Adam; AdamW; SGD with momentum 0.9): the fused Lookahead class on every
backend that is a speed path on the device, the generic `lookahead_fused.Lookahead` around
torch's fused optimizer, timm's Lookahead around the same and torch-optimi's Ranger (when
installed: optional extras, never dependencies), and torch's own optimizer without
Lookahead (fused, foreach, default) as the baseline to compare with.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import lookahead_fused
from lookahead_fused import backends

KS = (5, 10)  # Lookahead's k: a timed cycle is k steps, one of them a sync
ALPHA = 0.5

# Buffers per parameter besides θ and g, read and written every step: Adam's m and v, SGD's
# momentum buffer (DESIGN §4). A step reads θ g and the state and writes θ and the state; a
# sync step also reads and writes the slow weights φ.
STATE_BUFFERS = {"adam": 2, "adamw": 2, "sgd": 1}

# Backends that run on a device type only as a correctness tool, not as a speed path there.
_NOT_TIMED = {"cpu": {"triton": "Triton interpreter: a correctness tool", "cuda_emulated": "host emulation of CUDA"}}


@dataclass(frozen=True)
class Family:
    name: str  # "adam" | "adamw" | "sgd": the key of STATE_BUFFERS
    torch_class: type[Optimizer]
    lookahead_class: type[Optimizer]  # lookahead_fused's fused class
    hyper: dict[str, Any] = field(hash=False)  # what every contender of the family is built with


FAMILIES = (
    Family("adam", torch.optim.Adam, lookahead_fused.LookaheadAdam, {"lr": 1e-3}),
    Family("adamw", torch.optim.AdamW, lookahead_fused.LookaheadAdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    Family("sgd", torch.optim.SGD, lookahead_fused.LookaheadSGD, {"lr": 1e-2, "momentum": 0.9}),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)

Build = Callable[[list[Tensor]], Optimizer]
FP32 = torch.float32


@dataclass(frozen=True)
class Contender:
    name: str
    family: Family
    k: int
    lookahead: bool  # whether a step includes Lookahead (a sync every k steps)
    build: Build | None  # None when it cannot run here
    unavailable: str | None = None  # why not
    baseline: bool = False  # torch's fused optimizer: the row the others of the family are compared with
    floor: bool = False  # the streaming kernel with the fused Lookahead step's accesses
    # Where the state and the slow weights live for low-precision parameters: fp32 (the fused
    # classes; the wrapper's φ) or the parameter's dtype (torch.optim keeps its state so).
    state_fp32: bool = True
    slow_fp32: bool = True
    # The same contender built for CUDA-graph capture (capturable=True where the class has it);
    # None: not capturable (a Python-side counter decides the sync).
    graph_build: Build | None = None

    def bytes_per_param(self, dtype: torch.dtype = FP32) -> float:
        """Minimum traffic per parameter and step, amortised over a k-cycle for Lookahead:
        (k - 1) plain steps and one sync step. θ and g are in `dtype`."""
        state = FP32.itemsize if self.state_fp32 else dtype.itemsize
        plain = 3 * dtype.itemsize + 2 * STATE_BUFFERS[self.family.name] * state
        if not self.lookahead:
            return plain
        slow = FP32.itemsize if self.slow_fp32 else dtype.itemsize
        return plain + 2 * slow / self.k


def _timm_lookahead() -> tuple[type[Optimizer] | None, str | None]:
    """timm's Lookahead class. `import timm.optim` runs timm's package __init__, which imports
    torchvision (absent, or built for another torch, beside a CPU torch); the class's own
    module imports only torch, so when the package import fails but timm is installed, that
    one file is loaded on its own."""
    try:
        return importlib.import_module("timm.optim").Lookahead, None
    except ImportError as e:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            return None, f"timm not installed ({e})"
        path = Path(next(iter(spec.submodule_search_locations))) / "optim" / "lookahead.py"
        file_spec = importlib.util.spec_from_file_location("_bench_timm_lookahead", path)
        if file_spec is None or file_spec.loader is None or not path.is_file():
            return None, f"timm not importable ({e}) and {path} missing"
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module.Lookahead, None


def _optimi_ranger() -> tuple[type[Optimizer] | None, str | None]:
    try:
        return importlib.import_module("optimi").Ranger, None
    except ImportError as e:  # optional: torch-optimi
        return None, f"torch-optimi not installed ({e})"


def _family_contenders(family: Family, device: torch.device, k: int) -> list[Contender]:
    inner = family.torch_class.__name__

    def torch_opt(params: list[Tensor], **impl: bool) -> Optimizer:
        return family.torch_class(params, **family.hyper, **impl)

    out = []
    for backend in backends.NAMES:
        why = _NOT_TIMED.get(device.type, {}).get(backend) or backends.unavailable(backend, device)

        def fused(params: list[Tensor], backend: str = backend, **graph: bool) -> Optimizer:
            return family.lookahead_class(params, **family.hyper, k=k, alpha=ALPHA, backend=backend, **graph)

        out.append(
            Contender(
                f"{family.lookahead_class.__name__}(backend={backend})",
                family,
                k,
                True,
                None if why else fused,
                why,
                graph_build=lambda params, fused=fused: fused(params, capturable=True),
            )
        )

    out.append(_floor_contender(family, device, k))

    def wrapper(params: list[Tensor]) -> Optimizer:
        return lookahead_fused.Lookahead(torch_opt(params, fused=True), k=k, alpha=ALPHA)

    out.append(Contender(f"lookahead_fused.Lookahead({inner} fused)", family, k, True, wrapper, state_fp32=False))
    timm_lookahead, why = _timm_lookahead()

    def timm(params: list[Tensor]) -> Optimizer:
        return timm_lookahead(torch_opt(params, fused=True), k=k, alpha=ALPHA)

    out.append(
        Contender(
            f"timm Lookahead({inner} fused)",
            family,
            k,
            True,
            None if why else timm,
            why,
            state_fp32=False,
            slow_fp32=False,
        )
    )
    if family.name == "adam":  # Ranger is RAdam + Lookahead: the nearest to Lookahead(Adam) it has
        ranger, why = _optimi_ranger()

        def optimi(params: list[Tensor]) -> Optimizer:
            return ranger(params, lr=family.hyper["lr"], k=k, alpha=ALPHA)

        out.append(
            Contender(
                "torch-optimi Ranger (RAdam)",
                family,
                k,
                True,
                None if why else optimi,
                why,
                state_fp32=False,
                slow_fp32=False,
            )
        )
    # torch's SGD has no `capturable`: its fused step is capturable as it is (no step counter).
    capturable = {} if family.name == "sgd" else {"capturable": True}
    for impl in ("fused", "foreach", None):
        flags = {impl: True} if impl else {}
        out.append(
            Contender(
                f"torch {inner}({impl}=True)" if impl else f"torch {inner}(default)",
                family,
                k,
                False,
                lambda params, flags=flags: torch_opt(params, **flags),
                baseline=impl == "fused",
                state_fp32=False,
                graph_build=lambda params, flags=flags: torch_opt(params, **flags, **capturable),
            )
        )
    return out


def _floor_contender(family: Family, device: torch.device, k: int) -> Contender:
    """The bandwidth floor of a Lookahead step (k − 1 plain passes and a sync pass), measured
    by a streaming kernel (bench/floor.py): `_C`'s on the CPU, a Triton one on a GPU."""
    name = "floor: stream kernel, same bytes"
    from . import floor as floor_module

    if device.type == "cpu" and floor_module._C is None:
        return Contender(name, family, k, True, None, "lookahead_fused._C is not importable", floor=True)
    if device.type == "cuda" and floor_module.triton is None:
        return Contender(name, family, k, True, None, "Triton is not importable", floor=True)

    def floor(params: list[Tensor]) -> Any:
        n, dtype = sum(p.numel() for p in params), params[0].dtype
        return floor_module.FloorCycle(n, family.name, k, lookahead=True, param_dtype=dtype, device=params[0].device)

    return Contender(name, family, k, True, floor, floor=True)


def contenders(device: torch.device, families: tuple[str, ...] = ("adam", "sgd"), k: int = KS[0]) -> list[Contender]:
    """Every contender of the given families, available here or not, in table order."""
    if k < 1:
        raise ValueError(f"Invalid k: {k} (Lookahead's k must be at least 1)")
    return [c for family in FAMILIES if family.name in families for c in _family_contenders(family, device, k)]
