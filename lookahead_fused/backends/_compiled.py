"""What the compiled backends (cpu, cuda, cuda_emulated, triton) share: the routing of a
group the kernels cannot step to the backend's fallback, the checks made before a bucket's
addresses cross into a kernel, and the filling of the kernel arguments that describe a bucket.

Routing (`fallback_reasons`, `record`): the kernels walk a parameter and its state side by
side, linearly in memory, so they step only dense parameters; a parameter with gaps between
its elements (a view such as `torch.randn(10, 5, 2)[..., 0]` made a leaf) is stepped, with
its whole group, by the backend's fallback ("eager" for cpu, "foreach" for the others), the
same path that takes dtypes the kernels do not cover. Whether a bucket is dense is worked out
when its layout changes (Bucket.kernel_layout_problem), so a parameter made non-dense by
`.data = ...` routes from its next step on, and one made dense again returns to the kernels.
Who stepped each bucket, and why, is recorded as `Bucket.stepped_by`.

The kernels walk raw pointers: a parameter that is not dense, whose storage was shrunk
after the optimizer was built, or whose size no longer matches its state would make them
read or write out of bounds. These checks run when a backend (re)builds its tables, i.e.
whenever a parameter's address or size changes, and for gradients whenever one changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import reference
from .._buckets import COUNTER_KEYS, Bucket, holds, is_dense, where


def fallback_reasons(
    backend: str, buckets: list[Bucket], uncovered: Callable[[Bucket], str | None]
) -> list[str] | None:
    """None when the kernels of `backend` can step every bucket of a group; else, for each
    bucket, why the group goes to the backend's fallback. `uncovered(b)` is the backend's own
    rule (why its kernels do not cover b's dtypes, or None); then b's layout. There is one
    lookahead counter and one adaptive α per group: a bucket the kernels cannot step sends
    the whole group to the fallback. Cheap on a steady step: the layout is looked at again
    only when Bucket.moved saw it change."""
    reasons = [uncovered(b) or b.kernel_layout_problem() for b in buckets]
    first = next((r for r in reasons if r is not None), None)
    if first is None:
        return None
    other = f"its group also holds a bucket the {backend} kernels cannot step: {first}"
    return [other if r is None else r for r in reasons]


def record(buckets: list[Bucket], stepped_by: str, reasons: list[str] | None = None) -> None:
    """Set `Bucket.stepped_by` of every bucket of a group: the backend that stepped it, and
    why it was the fallback (None when the kernels did)."""
    for i, b in enumerate(buckets):
        b.stepped_by = (stepped_by, None if reasons is None else reasons[i])


def check_bucket(backend: str, b: Bucket) -> None:
    """The bucket's state buffers and parameters are what the kernels assume."""
    for key, buf in b.flat.items():
        want = len(b.params) if key in COUNTER_KEYS else b.numel
        if buf.device != b.device or not buf.is_contiguous() or buf.numel() != want:
            raise RuntimeError(f"the {backend} backend found state '{key}' of the wrong device, layout or size")
        if key in COUNTER_KEYS and buf.dtype != torch.float32:
            raise RuntimeError(f"the {backend} backend needs float32 counters, found {buf.dtype} for '{key}'")
    for i, p in enumerate(b.params):
        if p.device != b.device or p.dtype != b.dtype:
            raise RuntimeError(
                f"the {backend} backend got {where(i, p)} on {p.device} with dtype {p.dtype} "
                f"in a {b.dtype} bucket on {b.device}"
            )
        if not is_dense(p) or any(s < 0 for s in p.stride()):  # routed to the fallback before this
            raise RuntimeError(f"the {backend} backend needs dense parameters; {where(i, p)} has strides {p.stride()}")
    b.check_fit()  # sizes and storages, again right before the addresses cross into a kernel


def grad_scratch(backend: str, i: int, p: Tensor, g: Tensor) -> Tensor | None:
    """Check a gradient (the front-end has checked shape, device and dtype already). Returns
    None when the kernel can read it in place, or a scratch tensor with the parameter's
    layout that the caller must copy it into every step (its strides differ)."""
    if not holds(g):
        raise RuntimeError(f"the storage of the gradient of {where(i, p)} is smaller than the gradient")
    if g.stride() != p.stride() and p.numel() > 1:
        return torch.empty_like(p)  # p is dense: empty_like keeps its strides
    return None


def set_bucket_args(a: Any, kind: str, group: dict[str, Any], b: Bucket) -> None:
    """Fill the fields that `_C.StepArgs` (cpu) and `_C.LaunchArgs` (cuda) share: the
    variant, the bucket's state addresses (0 where the variant has no such buffer) and the
    group's hyperparameters. lr, alpha and the GradScaler inputs differ and are the caller's."""
    # The enums live in _C: read their types off the argument object, so that this module
    # does not import _C (the triton backend uses the checks above without it).
    a.kind = getattr(type(a.kind), kind)
    a.inner_state = getattr(type(a.inner_state), group["inner_state"])
    dtype = type(a.param_dtype)
    code = {torch.float32: dtype.float32, torch.bfloat16: dtype.bfloat16, torch.float16: dtype.float16}
    a.param_dtype, a.state_dtype, a.slow_dtype = code[b.dtype], code[b.state_dtype], code[b.slow_dtype]
    momentum_key = reference.MOMENTUM_KEY[kind]
    address = lambda key: b.flat[key].data_ptr() if key in b.flat else 0  # noqa: E731
    a.momentum, a.cached_momentum = address(momentum_key), address("cached_" + momentum_key)
    a.exp_avg_sq, a.max_exp_avg_sq = address("exp_avg_sq"), address("max_exp_avg_sq")
    a.slow, a.step = address("slow_weights"), address("step")
    a.weight_decay, a.maximize = group["weight_decay"], group["maximize"]
    if kind == "sgd":
        a.momentum_coef, a.dampening, a.nesterov = group["momentum"], group["dampening"], group["nesterov"]
    else:
        (a.beta1, a.beta2), a.eps, a.amsgrad = group["betas"], group["eps"], group["amsgrad"]


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Launches (and the torch ops around them) go to this device and its current stream, not
    to whichever device is current. torch's guard, not only the one in csrc/cuda: on leaving, it
    restores the previous device only where that device has a context, so that a process that
    works on cuda:1 alone does not get a context (and its memory) on cuda:0 from our launches."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def host_lr(lr: float | Tensor, device: torch.device, capturing: bool) -> float | None:
    """The learning rate as a float where the host reads it, or None where the kernel reads
    the tensor on the device. A tensor lr on the CPU beside parameters on a GPU is read on the
    host, as torch's fused optimizers read it (`.item()` of a CPU tensor waits for nothing),
    not copied to the device: a copy from pageable memory would wait for the GPU's stream
    every step. Under CUDA-graph capture its value would be frozen into the graph: refused,
    before anything is launched."""
    if not isinstance(lr, Tensor):
        return float(lr)
    if lr.device.type == "cpu" and device.type != "cpu":
        if capturing:
            raise RuntimeError(
                "lr is a CPU tensor: a CUDA graph would keep its value at capture; put the lr tensor "
                f"on the parameters' device ({device})"
            )
        return float(lr)
    return None
