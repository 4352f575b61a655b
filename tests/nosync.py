"""`no_host_sync()`: a context manager under which anything that would make the host wait
for the device, or copy host data to the device, raises `HostSyncError`.

What it catches (through a TorchFunctionMode, so every torch call inside the `with` is seen):
- reading a tensor's value on the host: `Tensor.item`, `bool(t)` (so `if t:` and `t == u`
  used as a condition), `float(t)`, `int(t)`, `complex(t)`, `operator.index(t)` (a tensor
  used as an index or a range bound), `Tensor.tolist`, `Tensor.numpy`, `np.asarray(t)`;
- ops whose output size depends on the data (the host must read it): `nonzero`,
  `masked_select`, `unique`, `Tensor.__getitem__` / `__setitem__` with a boolean mask, and
  `repeat_interleave` with tensor repeats but no `output_size`;
- creating a tensor from Python data (`torch.tensor`, `torch.as_tensor`, `Tensor.new_tensor`):
  on an accelerator that is a host-to-device copy, and it breaks CUDA graph capture;
- copies between a CPU tensor and a tensor on another device (`Tensor.to`, `.cpu()`,
  `.cuda()`, `copy_`).

On a CPU-only machine every tensor lives on the host, so "device" is the CPU: the first
three groups still fail exactly where they would sync on a GPU, which is what makes a step
capturable; the last group only fires where a second device exists.

`no_host_sync(async_uploads=True)` is the weaker check for a step that may build tables (the
first step, or one after a parameter moved): it must not make the host wait, but it may queue
host-to-device copies. Allowed then: a copy from pinned host memory to a device with
`non_blocking=True` (`dst.copy_(src, non_blocking=True)`, `src.to(device, non_blocking=True)`),
and tensors created from Python data on the host (`torch.tensor` without a device or with
the CPU). Still an error: any other copy from the host to a device (pageable memory, or
non_blocking=False: the host waits for the copy), every copy from a device to the host, and
the first three groups. "Pinned" is `Tensor.is_pinned()`, or the `pinned` predicate given
(CPU-only tests stand in for pinned memory, which needs an accelerator).

What it cannot see: Python scalars passed to ops (they travel as kernel arguments, no copy),
and syncs inside a custom C++ extension that bypasses the torch function layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncError", "no_host_sync"]


class HostSyncError(RuntimeError):
    """Raised inside `no_host_sync()` by an operation that would synchronise with the device."""


Tensor = torch.Tensor

_READS_VALUE = {
    Tensor.item,
    Tensor.__bool__,
    Tensor.__float__,
    Tensor.__int__,
    Tensor.__complex__,
    Tensor.__index__,
    Tensor.tolist,
    Tensor.numpy,
    Tensor.__array__,
}
_DATA_DEPENDENT_SIZE = {
    torch.nonzero,
    Tensor.nonzero,
    torch.masked_select,
    Tensor.masked_select,
    torch.unique,
    Tensor.unique,
    torch.unique_consecutive,
    Tensor.unique_consecutive,
}
_FROM_PYTHON_DATA = {torch.tensor, torch.as_tensor, Tensor.new_tensor}
_MOVES = {Tensor.to, Tensor.cpu, Tensor.cuda, Tensor.copy_}


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _device_types(values: Any) -> set[str]:
    """The device types named among an op's arguments: tensors, devices, device strings."""
    found: set[str] = set()
    for v in values:
        if isinstance(v, Tensor):
            found.add(v.device.type)
        elif isinstance(v, torch.device):
            found.add(v.type)
        elif isinstance(v, str):
            with contextlib.suppress(RuntimeError):
                found.add(torch.device(v).type)
    return found


class _NoHostSync(TorchFunctionMode):
    def __init__(self, async_uploads: bool = False, pinned: Callable[[Tensor], bool] | None = None) -> None:
        super().__init__()
        self.async_uploads = async_uploads
        self.pinned = pinned if pinned is not None else (lambda t: t.is_pinned())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        why = None
        if func in _READS_VALUE:
            why = "reads a tensor's value on the host"
        elif func in _DATA_DEPENDENT_SIZE:
            why = "has an output size that depends on the data"
        elif func in (Tensor.__getitem__, Tensor.__setitem__) and _has_bool_mask(args[1] if len(args) > 1 else None):
            why = "indexes with a boolean mask (output size depends on the data)"
        elif func in (torch.repeat_interleave, Tensor.repeat_interleave) and _tensor_repeats_without_size(args, kwargs):
            why = "repeats by a tensor without output_size"
        elif func in _FROM_PYTHON_DATA:
            if not (self.async_uploads and _device_types(kwargs.values()) <= {"cpu"}):
                why = "creates a tensor from Python data (a host-to-device copy)"
        elif func in _MOVES and args and isinstance(args[0], Tensor):
            why = self._move(func, args, kwargs)
        if why is not None:
            raise HostSyncError(f"{_name(func)} {why}: not allowed inside no_host_sync()")
        return func(*args, **kwargs)

    def _move(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        fixed = {Tensor.cpu: {"cpu"}, Tensor.cuda: {"cuda"}}
        if func is Tensor.copy_:  # dst.copy_(src): the data goes from src's device to dst's
            src = args[1] if len(args) > 1 else kwargs.get("src")
            if not isinstance(src, Tensor):
                return None
            data, source, targets = src, src.device.type, {args[0].device.type}
        else:
            data, source = args[0], args[0].device.type
            targets = fixed.get(func) or _device_types((*args[1:], *kwargs.values()))
        moved = {t for t in targets if t != source and "cpu" in (t, source)}
        if not moved:
            return None
        if self.async_uploads and source == "cpu":
            non_blocking = bool(kwargs.get("non_blocking", False))
            if func is Tensor.copy_ and len(args) > 2:
                non_blocking = bool(args[2])
            elif func is Tensor.to:  # to(device, dtype, non_blocking), to(dtype, non_blocking), to(other, non_blocking)
                non_blocking = non_blocking or next((a for a in args[1:] if isinstance(a, bool)), False)
            pinned = self.pinned(data)
            if pinned and non_blocking:
                return None
            how = "pinned" if pinned else "pageable"
            return (
                f"copies from {how} host memory to {', '.join(sorted(moved))} with non_blocking={non_blocking} "
                "(the host waits for the copy; only pinned memory with non_blocking=True is asynchronous)"
            )
        return f"copies between {source} and {', '.join(sorted(moved))}"


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def _tensor_repeats_without_size(args: tuple, kwargs: dict) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(repeats, Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None


@contextlib.contextmanager
def no_host_sync(async_uploads: bool = False, pinned: Callable[[Tensor], bool] | None = None) -> Iterator[None]:
    """Raise HostSyncError on any device-to-host synchronisation or host-to-device copy
    attempted by torch calls inside the `with` (see the module docstring for the list). With
    `async_uploads`, asynchronous copies from pinned host memory are allowed (`pinned` says
    which tensors are pinned; default `Tensor.is_pinned`)."""
    with _NoHostSync(async_uploads, pinned):
        yield
