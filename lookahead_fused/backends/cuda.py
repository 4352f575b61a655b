"""Backend "cuda": the hand-written CUDA kernels of `lookahead_fused._C` (csrc/cuda/).

One launch per bucket per step does the inner SGD / Adam / AdamW update and, on a sync step,
the lerp of the slow weights, the reset of the fast ones and the inner-state policy; a
one-block kernel then advances the bucket's counters (csrc/cuda/lookahead_kernels.cu explains
why the counters move in a launch of their own). The kernels decide on the device whether a
step syncs, read GradScaler's `grad_scale` / `found_inf` and a tensor `lr` on the device, and
compute adaptive α in a deterministic two-stage reduction on the device. So `step()` never
waits for the GPU and never copies host data to it, once the tables below are built:
capturable in a CUDA graph whether or not `capturable=True` was asked for.

Tables, built by `_Launcher` and kept in `bucket.backend_cache`:
- the segment table (one row per parameter: param address, grad address, numel, offset in
  the flat state, counter slot, has-grad; the layout of csrc/cpu_kernels.h) and the chunk
  table (segment, start) of chunks that never span two parameters, both int64 tensors on
  the bucket's device. Rebuilt when a parameter changes address or size; the gradient
  columns are rewritten (one host-to-device copy) when a gradient changes address, strides
  or dtype, e.g. every step after `zero_grad(set_to_none=True)`. A CUDA graph replays the
  same gradient buffers, so a captured step never needs that copy;
- for adaptive α, the group's buffer of per-block partial sums and its α̂ (fp64, device).

The same module drives backend "cuda_emulated" (backends/cuda_emulated.py): the same kernel
source compiled for the host, run on CPU tensors with a small grid; only the entry points,
the device type and the launch shape differ (`_Target`).

What the kernels compile: parameters in fp32, bf16 or fp16, math in fp32, state and slow
weights each in fp32 or the parameter's dtype. A group with anything else goes to the
"foreach" backend, which handles every dtype on every device with the same semantics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._buckets import Bucket
from . import foreach
from ._compiled import check_bucket, grad_scratch, set_bucket_args

try:
    from .. import _C
except ImportError as e:  # the compiled core is not built (e.g. a source checkout)
    _C = None
    _IMPORT_ERROR = f"lookahead_fused._C is not built: {e}"
else:
    _IMPORT_ERROR = None

_SEGMENT_COLUMNS = 6  # csrc/cpu_kernels.h: struct Segment
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Target:
    """What differs between the GPU build and the host emulation of the same kernels."""

    name: str
    device_type: str
    prefix: str  # of the _C entry points: "<prefix>step", "<prefix>finalize_alpha"
    chunk_size: int  # elements per chunk (a multiple of the vector width, 4)
    block: int  # threads per block (a power of two, at most 256)
    max_grid: Callable[[torch.device], int]
    stream: Callable[[torch.device], int]

    def entry(self, what: str) -> Callable[[Any], None]:
        return getattr(_C, self.prefix + what)

    def unavailable(self, device: torch.device) -> str | None:
        if device.type != self.device_type:
            return f"the {self.name} backend runs on {self.device_type.upper()} tensors"
        if _C is None:
            return _IMPORT_ERROR
        if not hasattr(_C, self.prefix + "step"):
            return "built without CUDA (nvcc was not found when lookahead_fused._C was built)"
        return None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# A few blocks per SM keep every SM streaming; more only adds blocks that find no chunk.
CUDA = _Target(
    name="cuda",
    device_type="cuda",
    prefix="cuda_",
    chunk_size=1 << 16,
    block=256,
    max_grid=lambda device: 4 * _sm_count(_index(device)),
    stream=lambda device: torch.cuda.current_stream(device).cuda_stream,
)


@functools.cache
def _cuda_reason(index: int) -> str | None:
    """Why the CUDA kernels cannot run on device `index` (the CUDA runtime's own answer)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    why = _C.cuda_kernel_unavailable(index)
    return why or None


def unavailable(device: torch.device) -> str | None:
    why = CUDA.unavailable(device)
    return why if why is not None else _cuda_reason(_index(device))


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    run_step(CUDA, kind, group, buckets, grads, grad_scale, found_inf)


# ---------------------------------------------------------------------------------------
# The step, shared with cuda_emulated.
# ---------------------------------------------------------------------------------------


def run_step(
    target: _Target,
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    if not all(_compiled(b) for b in buckets):
        # One counter and one adaptive α per group: the whole group takes the other path.
        foreach.step(kind, group, buckets, grads, grad_scale, found_inf)
        return
    launches = [_launch_args(target, kind, group, b, gs, grad_scale, found_inf) for b, gs in zip(buckets, grads)]
    launch = target.entry("step")
    if group.get("adaptive_alpha", False):
        partials, alpha_hat = _alpha_buffers(buckets[0], launches)
        offset = 0
        for a in launches:  # pass 1: inner step; on a sync step, per-block gᵀd and dᵀÂd
            a.phase, a.partials, a.advance_counters = _C.LaunchPhase.inner_dots, partials[offset:].data_ptr(), False
            launch(a)
            offset += 2 * a.grid
        f = _C.FinalizeArgs()
        f.partials, f.num_partials, f.alpha_out = partials.data_ptr(), offset // 2, alpha_hat.data_ptr()
        f.alpha, f.alpha_low = group["alpha"], group["alpha_low"]
        f.stream, f.device = launches[0].stream, launches[0].device
        target.entry("finalize_alpha")(f)
        for a in launches:  # pass 2: on a sync step, the sync with α̂; then the counters
            a.phase, a.alpha_ptr, a.advance_counters = _C.LaunchPhase.sync_only, alpha_hat.data_ptr(), True
            launch(a)
    else:
        for a in launches:
            launch(a)
    for b in buckets:
        b.host_count = None  # the counters moved on the device


def _compiled(bucket: Bucket) -> bool:
    """Whether the kernels cover this bucket's dtypes (see the module docstring)."""
    own = (torch.float32, bucket.dtype)
    return bucket.dtype in _SUPPORTED and bucket.state_dtype in own and bucket.slow_dtype in own


def _device_scalar(t: Tensor | None, b: Bucket, what: str) -> int:
    """Address of GradScaler's one-element fp32 tensor on the bucket's device (0 for None).
    GradScaler keeps one per device; another device's is copied, as torch's fused optimizers
    do, and kept alive in the bucket's cache until the next step."""
    if t is None:
        return 0
    if t.numel() != 1 or t.dtype != torch.float32:
        raise RuntimeError(f"{what} must be a one-element float32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != b.device:
        t = b.backend_cache["cuda_" + what] = t.to(b.device)
    return t.data_ptr()


def _launch_args(
    target: _Target,
    kind: str,
    group: dict[str, Any],
    b: Bucket,
    grads: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> Any:
    segments, chunks, grid = _tables(target, b, grads)
    a = _C.LaunchArgs()
    a.segments, a.num_segments = segments.data_ptr(), segments.shape[0]
    a.chunks, a.num_chunks, a.chunk_size = chunks.data_ptr(), chunks.shape[0], target.chunk_size
    a.grid, a.block = grid, target.block
    a.phase = _C.LaunchPhase.step
    set_bucket_args(a, kind, group, b)
    a.lookahead_step = b.flat["lookahead_step"].data_ptr()
    lr = group["lr"]
    if isinstance(lr, Tensor):  # read by the kernel: capturable, and no host sync
        if lr.device != b.device or lr.dtype not in (torch.float32, torch.float64):
            lr = _lr_on_device(b, lr)
        a.lr_ptr, a.lr_is_double = lr.data_ptr(), lr.dtype == torch.float64
    else:
        a.lr = float(lr)
    a.grad_scale_ptr = _device_scalar(grad_scale, b, "grad_scale")
    a.found_inf_ptr = _device_scalar(found_inf, b, "found_inf")
    a.alpha, a.k = group["alpha"], group["k"]
    a.stream = target.stream(b.device)
    a.device = b.device.index if b.device.index is not None else 0
    return a


def _lr_on_device(b: Bucket, lr: Tensor) -> Tensor:
    """A tensor lr on another device or of another dtype: copied into a cached fp64 buffer on
    the bucket's device (a copy between devices, which capture cannot contain: keep lr on the
    parameters' device for CUDA graphs)."""
    buf = b.backend_cache.get("cuda_lr")
    if buf is None:
        buf = b.backend_cache["cuda_lr"] = torch.empty((), dtype=torch.float64, device=b.device)
    buf.copy_(lr.reshape(()))
    return buf


def _alpha_buffers(first: Bucket, launches: list[Any]) -> tuple[Tensor, Tensor]:
    """The group's partial-sum buffer (two fp64 per block of every bucket) and α̂, allocated
    once and kept by the group's first bucket."""
    need = 2 * sum(a.grid for a in launches)
    cache = first.backend_cache
    partials = cache.get("cuda_alpha_partials")
    if partials is None or partials.numel() < need:
        partials = cache["cuda_alpha_partials"] = torch.zeros(need, dtype=torch.float64, device=first.device)
        cache["cuda_alpha_hat"] = torch.zeros((), dtype=torch.float64, device=first.device)
    return partials, cache["cuda_alpha_hat"]


# ---------------------------------------------------------------------------------------
# Segment and chunk tables.
# ---------------------------------------------------------------------------------------


def _tables(target: _Target, b: Bucket, grads: list[Tensor | None]) -> tuple[Tensor, Tensor, int]:
    """The bucket's (segment table, chunk table, grid) on its device, refreshed where
    something moved: the front-end's checks bump the bucket's versions (Bucket.moved, grads)."""
    cache = b.backend_cache
    param_key, grad_key = (target.name, b.param_version), b.grad_version  # see Bucket.moved / grads
    if cache.get("cuda_param_key") != param_key:
        rows, chunks = _build_rows(target, b)
        cache["cuda_rows"] = rows  # host copy; its gradient columns are rewritten below
        cache["cuda_segments"] = torch.empty_like(rows, device=b.device)
        cache["cuda_chunks"] = chunks.to(b.device)
        cache["cuda_grid"] = max(1, min(chunks.shape[0], target.max_grid(b.device)))
        cache["cuda_param_key"], cache["cuda_grad_key"] = param_key, None
        cache["cuda_builds"] = cache.get("cuda_builds", 0) + 1  # tests check that tables are reused
    if cache["cuda_grad_key"] != grad_key:
        cache["cuda_relayout"] = _set_grads(target, b, cache["cuda_rows"], grads)
        cache["cuda_segments"].copy_(cache["cuda_rows"])
        cache["cuda_grad_key"] = grad_key
    # Gradients whose strides differ from their parameter's are copied, every step, into a
    # scratch tensor with the parameter's layout (the table points at the scratch).
    for i, scratch in cache["cuda_relayout"].items():
        scratch.copy_(grads[i])
    return cache["cuda_segments"], cache["cuda_chunks"], cache["cuda_grid"]


def _build_rows(target: _Target, b: Bucket) -> tuple[Tensor, Tensor]:
    """Segment rows (gradient columns empty) and the chunk table, on the host."""
    check_bucket(target.name, b)
    rows, chunks = [], []
    for i, (p, offset) in enumerate(zip(b.params, b.offsets)):
        rows.append((p.data_ptr(), 0, p.numel(), offset, i, 0))
        chunks.extend((i, start) for start in range(0, p.numel(), target.chunk_size))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _SEGMENT_COLUMNS)
    return table, torch.tensor(chunks, dtype=torch.int64).reshape(-1, 2)


def _set_grads(target: _Target, b: Bucket, rows: Tensor, grads: list[Tensor | None]) -> dict[int, Tensor]:
    """Check the gradients and write their addresses into the host rows. Returns the scratch
    tensors of gradients that must be copied into their parameter's layout."""
    relayout: dict[int, Tensor] = {}
    columns = []
    for i, (p, g) in enumerate(zip(b.params, grads, strict=True)):
        scratch = None if g is None else grad_scratch(target.name, i, p, g)
        if scratch is not None:
            relayout[i] = scratch
        columns.append((0, 0) if g is None else ((g if scratch is None else scratch).data_ptr(), 1))
    rows[:, [1, 5]] = torch.tensor(columns, dtype=torch.int64).reshape(-1, 2)
    return relayout
