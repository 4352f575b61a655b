"""Buckets: the parameters of one group on one device with one dtype, their state flat.

(Complex parameters are stepped as their real views, in buckets of their own: see
`build_buckets`.)

A bucket owns its optimizer state as flat contiguous buffers, one per state entry
(`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, `momentum_buffer`, `slow_weights`, the
pullback caches) plus two fp32 counter vectors (`step` and `lookahead_step`, one slot per
parameter). `optimizer.state[p]` holds views of these buffers, so the per-parameter
`state_dict()` of torch.optim and the one-pass-per-bucket kernels see the same memory.

A view has the parameter's shape and strides (channels-last included) whenever the
parameter is dense, so state element i sits beside parameter element i in memory order
and a kernel can walk both linearly.

Each parameter's state starts at a multiple of 16 bytes in every flat buffer (`pack`): an
odd-sized tensor (a bias of 1,000 elements) would otherwise leave every later parameter's
state misaligned for the kernels' 128-bit accesses. The padding (at most 15 bytes a
parameter per buffer) is zero and belongs to no parameter.

Sharded parameters (DTensors, as FSDP2's `fully_shard` makes them): everything Lookahead
does is elementwise, so a bucket works on each parameter's local shard and its gradient's
local shard, with no communication. `optimizer.state[p]` then holds DTensors that wrap the
local state views with the parameter's mesh and placements, which is what
`torch.distributed.checkpoint` saves and loads.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import sys
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from . import _extension, reference

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# State entries that are counters (fp32 scalars), not tensors shaped like the parameter.
COUNTER_KEYS = ("step", "lookahead_step")

_GRAD, _SHAPE = operator.attrgetter("grad"), operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def _dtensor_class() -> type[DTensor] | None:
    """DTensor, if anything has imported it: a tensor cannot be one otherwise. Importing
    torch.distributed.tensor here would add about 2 s to `import lookahead_fused`."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(t: Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """What the kernels update for t: the part of it this process holds (a DTensor's local
    shard: the shard tensor itself, not a `to_local()` view, so its address is the memory the
    shard lives in), as real numbers (a complex tensor's real view, (..., 2), as torch.optim
    steps complex parameters); t itself for a plain real tensor."""
    if is_sharded(t):
        t = t._local_tensor  # type: ignore[attr-defined]
    return reference.as_real(t)


def _wrap_like(view: Tensor, p: Tensor) -> Tensor:
    """A DTensor over a local state view, sharded like the parameter p (no copy)."""
    cls = _dtensor_class()
    assert cls is not None  # p is one
    p = cast("DTensor", p)
    return cls.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off for the body. A layout key is tens of
    thousands of short-lived acyclic tuples (a `torch.Size` and a strides tuple per tensor):
    a collection while they are alive promotes them to the older generations and so brings
    on full collections of the whole heap (measured with 10,000 tensors: one of about 170 ms
    every few steps, doubling the mean step time). Built, compared and dropped with the
    collector held off, they are freed by reference counting before it could see them."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def python_layout_key(tensors: Sequence[Tensor | None]) -> Hashable:
    """Address, shape, strides and dtype of every tensor, and where the Nones are, read with
    torch's C-level Python accessors (five passes, about 0.5 us a tensor). Equal keys mean
    that whatever was checked about the tensors' memory still holds. The device is not read:
    it follows from the address (a tensor moves to another device only into another
    allocation, and no two live allocations of different devices share an address, CUDA's
    unified addressing included). Raises RuntimeError for tensors without strided storage
    (sparse)."""
    has = tuple(map(operator.is_not, tensors, repeat(None)))
    ts = tensors if all(has) else list(compress(tensors, has))
    return (
        has,
        tuple(map(Tensor.data_ptr, ts)),  # type: ignore[arg-type]
        tuple(map(_SHAPE, ts)),
        tuple(map(Tensor.stride, ts)),  # type: ignore[arg-type]
        tuple(map(_DTYPE, ts)),
    )


# The key the checks compare at every step: the same fields read in C++ from the at::Tensor
# behind each tensor and packed into one bytes object (csrc/tensor_keys.cpp, about 25 ns a
# tensor), where lookahead_fused._tensor_keys was built for this torch; else the Python one.
# Both raise RuntimeError for tensors without strided storage. tests/test_tensor_keys.py
# checks that the two tell the same changes apart.
layout_key: Callable[[Sequence[Tensor | None]], Hashable] = (
    python_layout_key if _extension.TENSOR_KEYS is None else _extension.TENSOR_KEYS.layout_key
)


def python_grads(tensors: Sequence[Tensor]) -> list[Tensor | None]:
    """[t.grad for t in tensors], through torch's Python getter (about 0.18 us a tensor)."""
    return list(map(_GRAD, tensors))


# The same list read in C++ where lookahead_fused._tensor_keys is built (the same objects).
grads_of: Callable[[Sequence[Tensor]], list[Tensor | None]] = (
    python_grads if _extension.TENSOR_KEYS is None else _extension.TENSOR_KEYS.grads
)


def is_dense(t: Tensor) -> bool:
    """True when t's elements fill exactly numel() consecutive slots of its storage (any order)."""
    if t.numel() == 0:
        return True  # nothing to place (torch gives such tensors arbitrary strides, e.g. (1, 1))
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def holds(t: Tensor) -> bool:
    """The tensor's storage really holds its numel() elements from its data pointer on (a
    storage can be resized after the tensor was made)."""
    return t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size()


def where(i: int, p: Tensor) -> str:
    return f"parameter {i} of shape {tuple(p.shape)}"


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def view_like(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """A view of flat[offset : offset + like.numel()] with like's shape (and strides if dense)."""
    if is_dense(like):
        return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)
    return flat[offset : offset + like.numel()].view(like.shape)


# The state of every parameter starts at a multiple of this many bytes in every flat buffer.
STATE_ALIGNMENT = 16


def pack(params: list[Tensor], *dtypes: torch.dtype) -> tuple[list[int], int]:
    """(offsets, total): where each parameter's state starts in flat buffers of these dtypes,
    in elements, each a multiple of STATE_ALIGNMENT bytes in all of them, and their length."""
    step = max(1, STATE_ALIGNMENT // min(d.itemsize for d in dtypes))
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // step) * step
    return offsets, total


def state_keys(kind: str, group: dict[str, Any]) -> list[str]:
    """The parameter-shaped state entries a group needs, besides the slow weights."""
    if kind == "sgd":
        keys = ["momentum_buffer"] if group["momentum"] != 0 else []
    else:
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
    momentum = reference.MOMENTUM_KEY[kind]
    if group["inner_state"] == "pullback" and momentum in keys:
        keys.append("cached_" + momentum)
    return keys


def default_dtypes(param_dtype: torch.dtype, group: dict[str, Any]) -> tuple[torch.dtype, torch.dtype]:
    """(state dtype, slow-weight dtype): fp32 for bf16/fp16 parameters unless overridden."""
    low = param_dtype in (torch.bfloat16, torch.float16)
    default = torch.float32 if low else param_dtype
    return (group.get("state_dtype") or default, group.get("slow_dtype") or default)


@dataclass
class Bucket:
    params: list[Tensor]  # what the kernels update: the parameters, or their local shards
    offsets: list[int]
    numel: int
    device: torch.device
    dtype: torch.dtype
    state_dtype: torch.dtype
    slow_dtype: torch.dtype
    flat: dict[str, Tensor]  # state key -> flat buffer ("step" and "lookahead_step" of length n)
    views: list[dict[str, Tensor]]  # per parameter: its state views (optimizer.state[p], or wrapped)
    # The parameters as registered in the group (DTensors for FSDP2, complex tensors); None
    # when they are the `params` themselves.
    owners: list[Tensor] | None = None
    # Per parameter, the state dict `optimizer.state[owner]` holds when it is not `views[i]`
    # (a sharded or complex owner: DTensors, complex views of the same memory); else None.
    owner_views: list[dict[str, Tensor] | None] | None = None
    # The group's lookahead counter as the host knows it; None after a step whose sync
    # decision was made on the device (GradScaler's found_inf, capturable).
    host_count: int | None = None
    backend_cache: dict[str, Any] = field(default_factory=dict)
    # What the checks of the parameters and of the gradients last saw (`layout_key`), and a
    # version number bumped whenever it changed: the compiled backends rebuild their address
    # tables when a version moves, so neither side re-walks 467 tensors on a steady step.
    param_key: Hashable | None = None
    param_version: int = 0
    grad_key: Hashable | None = None
    grad_version: int = 0
    # Which backend stepped the bucket last, and why that is not the one the optimizer asked
    # for: (name, None) when the compiled backend's own kernels did, (fallback name, reason)
    # when its group went to the fallback ("eager" for cpu, "foreach" for cuda, cuda_emulated
    # and triton): a parameter with gaps between its elements (`kernel_layout_problem`), or
    # dtypes the kernels do not cover. Set by the compiled backends on every step
    # (backends/_compiled.record); None until one has stepped the bucket ("eager" and
    # "foreach" step whatever they are given and do not record).
    stepped_by: tuple[str, str | None] | None = None
    # (param_version, kernel_layout_problem()) as last worked out.
    _layout_problem: tuple[int, str | None] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def sharded(self) -> bool:
        """Whether some parameter is a DTensor (FSDP2): the bucket steps its local shards."""
        return self.owners is not None and any(map(is_sharded, self.owners))

    def kernel_layout_problem(self) -> str | None:
        """Why kernels that walk a parameter and its state side by side, linearly in memory,
        cannot step this bucket: a parameter that is not dense (a view with gaps between its
        elements, such as `torch.randn(10, 5, 2)[..., 0]`, overlapping or negative strides),
        or None when every parameter is. Worked out once per layout of the parameters
        (`param_version`, which `moved` bumps whenever an address, shape or strides change,
        e.g. `.data` replaced), so a steady step compares one number and walks no tensor."""
        cached = self._layout_problem
        if cached is None or cached[0] != self.param_version:
            problem = None
            for i, p in enumerate(self.params):
                if not is_dense(p) or any(s < 0 for s in p.stride()):
                    problem = f"{where(i, p)} is not dense (strides {p.stride()})"
                    break
            cached = self._layout_problem = (self.param_version, problem)
        return cached[1]

    def moved(self) -> bool:
        """Refresh `param_key`. True when the bucket no longer describes its parameters (a
        dtype or device changed: `model.half()`, `.to()`), i.e. it must be rebuilt; a new
        address, shape or strides (`.data` replaced) only bumps `param_version`."""
        if self.owners is not None:
            self.params = list(map(local, self.owners))  # FSDP2 may re-point a shard
        with collector_paused():
            key = layout_key(self.params)
            changed = key != self.param_key
            if not changed:
                del key  # freed here, with the collector held off
        if changed:
            if any(p.dtype != self.dtype or p.device != self.device for p in self.params):
                return True
            self.check_fit()
            self.follow_layouts()
            self.param_key, self.grad_key = key, None  # the gradients are checked against p again
            self.param_version += 1
        return False

    def follow_layouts(self) -> None:
        """Give every state view its parameter's current memory order (channels_last after
        `model.to(memory_format=...)`, `.data` replaced by a tensor of other strides), values
        kept: the kernels walk a parameter and its state side by side in memory, so state
        element i must stay beside parameter element i. Each view is re-strided in place, so
        `optimizer.state[p]` and any reference to its tensors stay valid."""
        owner_views = self.owner_views or [None] * len(self.params)
        for p, view, owner_view in zip(self.params, self.views, owner_views):
            want = p.stride() if is_dense(p) else _contiguous_strides(p.shape)
            for key, t in view.items():
                if key in COUNTER_KEYS or (t.stride() == want and t.shape == p.shape):
                    continue
                values = t.clone()  # in logical order
                t.as_strided_(p.shape, want, t.storage_offset())
                t.copy_(values.reshape(p.shape))
                c = None if owner_view is None else owner_view.get(key)
                if c is not None and c.is_complex() and not is_sharded(c):
                    # The complex view the state dict holds, over the same memory, follows too
                    # (a real view's strides are the complex ones doubled, plus a 1 for the parts).
                    c.as_strided_(p.shape[:-1], [s // 2 for s in want[:-1]], t.storage_offset() // 2)

    def check_fit(self) -> None:
        """Refuse a parameter that no longer fits its state (`.data` of another size, a shrunk
        storage) before any backend reads or writes through it."""
        ends = [*self.offsets[1:], self.numel]
        for i, (p, start, end) in enumerate(zip(self.params, self.offsets, ends)):
            # The size its state was built for (its view; a bucket without views, as the
            # torch.compile op makes them, was laid out for these very parameters).
            size = self.views[i]["slow_weights"].numel() if self.views else p.numel()
            if p.numel() != size or start + size > end:
                raise RuntimeError(f"{where(i, p)} has {p.numel()} elements, its optimizer state {size}")
            if not holds(p):
                raise RuntimeError(f"the storage of {where(i, p)} is smaller than the parameter (was it resized?)")

    def grads(self, who: str) -> list[Tensor | None]:
        """The parameters' gradients, checked before any backend touches them; the checks
        run again only when a gradient's address, shape, strides, dtype or device changed."""
        if self.owners is None:
            grads = grads_of(self.params)
        else:
            grads = [self._local_grad(who, p) for p in self.owners]
        self.check_grads(who, grads)
        return grads

    @staticmethod
    def _local_grad(who: str, p: Tensor) -> Tensor | None:
        g = p.grad
        if g is None:
            return None
        if is_sharded(p) and (
            not is_sharded(g) or g.placements != p.placements or g.device_mesh != p.device_mesh  # type: ignore[attr-defined]
        ):
            raise RuntimeError(f"{who}: the gradient of a sharded parameter is not sharded like it")
        if g.is_complex() != p.is_complex():  # .grad.data of the other kind: autograd refuses it otherwise
            raise RuntimeError(f"{who}: gradient of dtype {g.dtype} for a parameter of dtype {p.dtype}")
        return local(g)

    def check_grads(self, who: str, grads: list[Tensor | None]) -> None:
        """Check these gradients of the parameters (read from `.grad` by `grads()`, or handed
        to the torch.compile op, lookahead_fused._ops), unless the same layout was checked
        last time; `grad_key` and `grad_version` say what was checked."""
        with collector_paused():
            try:
                key: Hashable | None = layout_key(grads)
            except RuntimeError:  # no strided storage (sparse): the checks below say what is wrong
                key = None
            changed = key is None or key != self.grad_key
            if not changed:
                del key  # freed here, with the collector held off
        if changed:
            self._check_grads(who, grads)
            self.grad_key = key
            self.grad_version += 1

    def _check_grads(self, who: str, grads: list[Tensor | None]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            if g is not None:
                if g.layout != torch.strided:
                    raise RuntimeError(f"{who} does not support sparse gradients (layout {g.layout})")
                if g.shape != p.shape:
                    raise RuntimeError(
                        f"{who}: gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
                if g.device != p.device:
                    raise RuntimeError(f"{who}: gradient on {g.device} for a parameter on {p.device}")
                if g.dtype != p.dtype:
                    raise RuntimeError(f"{who}: gradient of dtype {g.dtype} for a parameter of dtype {p.dtype}")


def build_buckets(kind: str, group: dict[str, Any], state: dict[Tensor, dict[str, Any]]) -> list[Bucket]:
    """Group a param group's parameters by (device, dtype) and move their state into flat
    buffers. Existing per-parameter state (a previous bucket's views, a loaded checkpoint, a
    plain torch.optim state dict) is copied in; what is missing starts fresh (φ ← θ)."""
    # Complex parameters get buckets of their own: their state is shown as complex views of
    # the flat buffers, and torch.save refuses a storage viewed as two dtypes.
    by_key: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
    seen: set[int] = set()
    for p in group["params"]:
        if id(p) not in seen:  # a parameter listed twice (tied weights) is updated once
            seen.add(id(p))
            shard = local(p)
            by_key.setdefault((shard.device, shard.dtype, p.is_complex()), []).append(p)

    # The group's lookahead counter: every parameter holds the same value; a checkpoint from
    # torch.optim has none and starts the cycle at 0.
    count = 0.0
    for p in group["params"]:
        saved = state.get(p, {}).get("lookahead_step")
        if saved is not None:
            count = float(saved)
            break

    keys = state_keys(kind, group)
    buckets = []
    for (device, dtype, _), owners in by_key.items():
        params = list(map(local, owners))
        sdt, pdt = default_dtypes(dtype, group)
        offsets, total = pack(params, sdt, pdt)
        flat = {key: torch.zeros(total, dtype=sdt, device=device) for key in keys}
        flat["slow_weights"] = torch.zeros(total, dtype=pdt, device=device)  # zeros: the padding
        flat["step"] = torch.zeros(len(params), dtype=torch.float32, device=device)
        flat["lookahead_step"] = torch.full((len(params),), count, dtype=torch.float32, device=device)

        views = []
        owner_views: list[dict[str, Tensor] | None] = []
        for i, (owner, p, off) in enumerate(zip(owners, params, offsets)):
            old = state.get(owner, {})
            view = {key: view_like(flat[key], off, p) for key in keys}
            view["slow_weights"] = view_like(flat["slow_weights"], off, p)
            view["step"] = flat["step"][i]
            view["lookahead_step"] = flat["lookahead_step"][i]
            for key in (*keys, "slow_weights"):
                value = old.get(key)
                if value is None:
                    if key == "slow_weights":
                        value = p.detach()  # φ ← θ
                    else:
                        continue
                value = _local_state(owner, key, value)
                value = reference.as_real(value)  # a complex parameter's state, saved as torch.optim keeps it
                if value.numel() != p.numel():
                    raise ValueError(
                        f"state '{key}' has {value.numel()} elements for a parameter of shape {tuple(p.shape)}"
                    )
                view[key].copy_(value.reshape(p.shape))
            if "step" in old:
                view["step"].fill_(float(old["step"]))
            elif kind == "sgd" and old.get("momentum_buffer") is not None:
                view["step"].fill_(1.0)  # torch.optim.SGD's buffer exists: it is initialised
            views.append(view)
            if owner is p:
                state[owner] = view
                owner_views.append(None)
            else:  # what a checkpoint sees: complex like the parameter, sharded like it
                state[owner] = {key: v if key in COUNTER_KEYS else _owner_view(v, owner) for key, v in view.items()}
                owner_views.append(state[owner])
        wrapped = any(o is not p for o, p in zip(owners, params))
        buckets.append(
            Bucket(
                params,
                offsets,
                total,
                device,
                dtype,
                sdt,
                pdt,
                flat,
                views,
                owners=owners if wrapped else None,
                owner_views=owner_views if wrapped else None,
                host_count=int(count),
            )  # fmt: skip
        )
    return buckets


def _owner_view(view: Tensor, owner: Tensor) -> Tensor:
    """A state view as `optimizer.state[owner]` shows it: complex for a complex parameter (its
    real view's memory: the flat buffers keep every parameter 16-byte aligned, so the offset
    is a whole number of complex elements), a DTensor sharded like a sharded one (no copy)."""
    if owner.is_complex():
        view = torch.view_as_complex(view)
    return _wrap_like(view, owner) if is_sharded(owner) else view


def _local_state(owner: Tensor, key: str, value: Tensor) -> Tensor:
    """A saved state tensor as this process's part of it: a DTensor must be sharded like its
    parameter (as torch.distributed.checkpoint loads it); its local shard is copied in."""
    if not is_sharded(value):
        return value
    if not is_sharded(owner) or value.placements != owner.placements:  # type: ignore[attr-defined]
        raise ValueError(f"state '{key}' is a DTensor sharded unlike its parameter")
    return local(value)
