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

What it cannot see: Python scalars passed to ops (they travel as kernel arguments, no copy),
and syncs inside a custom C++ extension that bypasses the torch function layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
            why = "creates a tensor from Python data (a host-to-device copy)"
        elif func in _MOVES and args and isinstance(args[0], Tensor):
            source = args[0].device.type
            fixed = {Tensor.cpu: {"cpu"}, Tensor.cuda: {"cuda"}}
            targets = fixed.get(func) or _device_types((*args[1:], *kwargs.values()))
            moved = {t for t in targets if t != source and "cpu" in (t, source)}
            if moved:
                why = f"copies between {source} and {', '.join(sorted(moved))}"
        if why is not None:
            raise HostSyncError(f"{_name(func)} {why}: not allowed inside no_host_sync()")
        return func(*args, **kwargs)


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def _tensor_repeats_without_size(args: tuple, kwargs: dict) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(repeats, Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise HostSyncError on any device-to-host synchronisation or host-to-device copy
    attempted by torch calls inside the `with` (see the module docstring for the list)."""
    with _NoHostSync():
        yield
