"""Backend "cuda_emulated": the CUDA kernels of csrc/cuda/ compiled by the host compiler and
run on CPU tensors (DESIGN.md §5). It exists so that every line of the CUDA backend's kernels
and launch logic is executed against the reference on machines without a GPU; it is slow
(threads of a block run one after another) and meant for tests, not training.

Everything but the target is backends/cuda.py: the same tables, launches and device-side
decisions. The grid is small (at most 3 blocks of 32 threads) and chunks are short, so that
small test models still exercise several blocks, the grid-stride loop over chunks and the
two-stage reduction of adaptive α.

Fake devices (csrc/cuda_compat.h): before each launch, the address ranges of every tensor the
launch may touch (parameters, gradients and their scratch copies, the bucket's state buffers,
its tables, adaptive α's buffers, the device scalars) are registered for the launch's emulated
device, so an access anywhere else (another device's tensor, past a tensor's end) fails the
launch with "illegal address". `_C.emulated_set_block_order_seed` and `_C.emulated_set_strict`
make blocks run in a shuffled order and turn on the race detector.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._buckets import Bucket
from .cuda import _C, _Target, run_step

# The tensors of the step in progress on this thread (set by step(), read at each launch).
_current = threading.local()


def _tensors(context: tuple, device: int, target: _Target) -> list[Tensor]:
    """The tensors of the step in progress that live on emulated device `device`: those of the
    buckets on it, and GradScaler's scalars and a tensor lr where they are on a bucket's device
    (the backend copies them to the others)."""
    group, buckets, grads, grad_scale, found_inf = context
    out: list[Tensor] = []
    for b, gs in zip(buckets, grads):
        if target.index(b.device) != device:
            continue
        out += [t for t in (grad_scale, found_inf, group.get("lr")) if isinstance(t, Tensor) and t.device == b.device]
        out += list(b.params) + [g for g in gs if g is not None] + list(b.flat.values())
        for key, value in b.backend_cache.items():
            if key == "cuda_rows":  # the host copy of the segment table (host memory on a GPU)
                continue
            if isinstance(value, Tensor):
                out.append(value)
            elif isinstance(value, dict):  # cuda_relayout (gradient scratch), cuda_captured
                out += [t for t in value.values() if isinstance(t, Tensor)]
    return out


def _register(device: int, target: _Target) -> None:
    context = getattr(_current, "context", None)
    if context is None:
        return
    tensors = _tensors(context, device, target)
    ranges = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t.device.type == "cpu"]
    _C.emulated_set_device_ranges(device, ranges)
    _current.devices.add(device)


@dataclass(frozen=True)
class _EmulatedTarget(_Target):
    """The emulation's entry points register the launch's tensors for its device first."""

    def entry(self, what: str) -> Callable[[Any], None]:
        launch = super().entry(what)

        def checked(args: Any) -> None:
            _register(args.device, self)
            launch(args)

        return checked


EMULATED = _EmulatedTarget(
    name="cuda_emulated",
    device_type="cpu",
    prefix="emulated_",
    chunk_size=256,
    block=32,
    max_grid=lambda device: 3,
    stream=lambda device: 0,
)


def unavailable(device: torch.device) -> str | None:
    return EMULATED.unavailable(device)


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    with checked_memory(group, buckets, grads, grad_scale, found_inf):
        run_step(EMULATED, kind, group, buckets, grads, grad_scale, found_inf)


@contextlib.contextmanager
def checked_memory(group: dict[str, Any], buckets: list[Bucket], grads: list[list[Tensor | None]],
                   grad_scale: Tensor | None, found_inf: Tensor | None) -> Iterator[None]:  # fmt: skip
    """While it is open, every launch through an _EmulatedTarget may touch only the tensors of
    this step that live on the launch's device ("illegal address" otherwise)."""
    _current.context, _current.devices = (group, buckets, grads, grad_scale, found_inf), set()
    try:
        yield
    finally:
        for device in _current.devices:  # the tensors may go away: check nothing stale later
            _C.emulated_clear_device_ranges(device)
        _current.context = None
