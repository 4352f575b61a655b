"""Backend "cpu": the fused C++ kernels of `lookahead_fused._C` on CPU tensors.

One pass per bucket per step does the inner SGD / Adam / AdamW update and, on a sync step,
the lerp of the slow weights, the reset of the fast ones and the inner-state policy
(csrc/cpu_kernels.cpp; the per-element math is csrc/lookahead_math.h). The kernel reaches
the parameters and gradients through a segment table per bucket: an int64 tensor of rows
(param address, grad address, numel, offset in the flat state, step slot, has grad),
cached in `bucket.backend_cache`: rebuilt when a parameter changes address or size
(`.data` replaced, `model.half()`), and its gradient columns rewritten when a gradient
changes address, strides or dtype (a new `.grad` after `zero_grad(set_to_none=True)`).
Every address is checked here before it crosses into C++: device, dtype, density and that
the storage really holds the elements.

On the CPU reading `found_inf` and the counters costs nothing, so the sync decision is
made here. Adaptive α costs one extra pass on sync steps: the first pass does the inner
step and returns the two dot products of every bucket, the group's α̂ is computed from
their sums, and a second pass does the sync with it.

What the kernels compile: parameters in fp32, bf16 or fp16, math in fp32, state and slow
weights each in fp32 or the parameter's dtype, of dense parameters (the kernel walks a
parameter and its state side by side in memory). A group with anything else (fp64
parameters, overrides such as bf16 state with fp16 slow weights for a bf16 model, or a
parameter with gaps between its elements, such as `torch.randn(10, 5, 2)[..., 0]`) is
stepped by the reference implementation (backend "eager"), so "cpu" accepts everything
the front-end does and is fast where models actually are. `Bucket.stepped_by` records
which of the two stepped a bucket, and why (backends/_compiled.py).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from .._buckets import Bucket
from . import eager
from ._compiled import check_bucket, fallback_reasons, grad_scratch, record, set_bucket_args

try:
    from .. import _C  # type: ignore[attr-defined]  # compiled (pybind11): mypy sees no module
except ImportError as e:  # the compiled core is not built (e.g. a source checkout)
    _C = None
    _IMPORT_ERROR: str | None = f"lookahead_fused._C is not built: {e}"
else:
    _IMPORT_ERROR = None

# LOOKAHEAD_FUSED_CPU_ISA=x86-64-v3 (or x86-64, x86-64-v4) runs the kernels of that level
# instead of the highest one the CPU supports: to compare levels on one machine (the
# benchmark), or to take a level out of use. A level that was not built or that the CPU
# lacks is an error at import, not a crash later.
_ISA = os.environ.get("LOOKAHEAD_FUSED_CPU_ISA")
if _C is not None and _ISA:
    try:
        _C.cpu_set_isa(_ISA)
    except ValueError as e:
        raise ValueError(f"LOOKAHEAD_FUSED_CPU_ISA={_ISA!r}: {e}") from None

# Elements per OpenMP work item: large enough that a thread streams through whole pages,
# small enough that 60 M elements give every thread hundreds of items to balance.
CHUNK = 1 << 16

_SEGMENT_COLUMNS = 6  # csrc/cpu_kernels.h: struct Segment


def unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the cpu backend runs on CPU tensors"
    return _IMPORT_ERROR


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return  # GradScaler found an inf/NaN: nothing changes, the counters included
    reasons = fallback_reasons("cpu", buckets, _uncovered)
    if reasons is not None:
        # One counter and one adaptive α per group: the whole group takes the other path.
        eager.step(kind, group, buckets, grads, grad_scale, found_inf)
        record(buckets, "eager", reasons)
        return

    tables = [_segment_table(b, gs) for b, gs in zip(buckets, grads, strict=True)]
    count = int(buckets[0].flat["lookahead_step"][0].item()) + 1  # every slot holds the group's counter
    sync = count % group["k"] == 0
    scale = 1.0 if grad_scale is None else float(grad_scale.item())
    args = [_step_args(kind, group, b, table, scale) for b, table in zip(buckets, tables, strict=True)]

    if sync and group.get("adaptive_alpha", False):
        # Pass 1: the inner step and, per bucket, gᵀd and dᵀÂd (reference.adaptive_alpha).
        g_dot_d = d_a_d = 0.0
        for a in args:
            a.phase = _C.Phase.inner_dots
            gd, dad = _C.lookahead_step(a)
            g_dot_d, d_a_d = g_dot_d + gd, d_a_d + dad
        alpha = group["alpha"]
        if d_a_d != 0.0 and math.isfinite(d_a_d):
            alpha = min(max(1.0 + g_dot_d / d_a_d, group["alpha_low"]), 1.0)
        # Pass 2: the sync with the group's α̂.
        for a in args:
            a.phase, a.alpha = _C.Phase.sync_only, alpha
            _C.lookahead_step(a)
    else:
        for a in args:
            a.phase = _C.Phase.sync if sync else _C.Phase.plain
            _C.lookahead_step(a)

    for b in buckets:
        b.flat["lookahead_step"].add_(1)
        b.host_count = count
    record(buckets, "cpu")


def _compiled(bucket: Bucket) -> bool:
    """Whether the C++ kernels cover this bucket's dtypes (see the module docstring)."""
    supported = (torch.float32, torch.bfloat16, torch.float16)
    own = (torch.float32, bucket.dtype)
    return bucket.dtype in supported and bucket.state_dtype in own and bucket.slow_dtype in own


def _uncovered(bucket: Bucket) -> str | None:
    """Why the C++ kernels do not cover this bucket's dtypes, or None."""
    if _compiled(bucket):
        return None
    return (
        f"the cpu kernels do not cover {bucket.dtype} parameters with {bucket.state_dtype} state "
        f"and {bucket.slow_dtype} slow weights"
    )


def _step_args(kind: str, group: dict[str, Any], b: Bucket, table: Tensor, grad_scale: float) -> Any:
    a = _C.StepArgs()
    a.table, a.num_segments, a.numel, a.chunk = table.data_ptr(), table.shape[0], b.numel, CHUNK
    set_bucket_args(a, kind, group, b)
    lr = group["lr"]
    a.lr = lr.item() if isinstance(lr, Tensor) else float(lr)
    a.alpha = group["alpha"]
    a.grad_scale = grad_scale
    return a


# ---------------------------------------------------------------------------------------
# The segment table.
# ---------------------------------------------------------------------------------------


def _segment_table(b: Bucket, grads: list[Tensor | None]) -> Tensor:
    """The bucket's table, refreshed where something moved, as the front-end's checks report
    it (`Bucket.param_version`, `Bucket.grad_version`): a parameter's new address, shape or
    strides (`.data` replaced) rebuilds the whole table (about 2 ms for 467 tensors); a
    gradient's new address, strides or dtype only rewrites the gradient columns: with
    `zero_grad(set_to_none=True)` that happens every step."""
    cache = b.backend_cache
    if cache.get("param_version") != b.param_version:
        cache["table"] = _build_table(b)
        cache["param_version"], cache["grad_version"] = b.param_version, None
        cache["builds"] = cache.get("builds", 0) + 1  # tests check that tables are reused
    if cache["grad_version"] != b.grad_version:
        cache["relayout"] = _set_grads(b, cache["table"], grads)
        cache["grad_version"] = b.grad_version
        cache["grad_updates"] = cache.get("grad_updates", 0) + 1
    # Gradients whose layout differs from their parameter's are copied, every step, into a
    # scratch tensor with the parameter's layout (the table points at the scratch).
    for i, scratch in cache["relayout"].items():
        scratch.copy_(grads[i])
    return cache["table"]


def _build_table(b: Bucket) -> Tensor:
    """Rows for the parameters (gradient columns empty)."""
    check_bucket("cpu", b)
    rows = [(p.data_ptr(), 0, p.numel(), offset, i, 0) for i, (p, offset) in enumerate(zip(b.params, b.offsets))]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, _SEGMENT_COLUMNS)


def _set_grads(b: Bucket, table: Tensor, grads: list[Tensor | None]) -> dict[int, Tensor]:
    """Check the gradients and write their addresses into the table. Returns the scratch
    tensors of gradients that must be copied into their parameter's layout."""
    relayout: dict[int, Tensor] = {}
    columns = []
    for i, (p, g) in enumerate(zip(b.params, grads, strict=True)):
        scratch = None if g is None else grad_scratch("cpu", i, p, g)
        if scratch is not None:
            relayout[i] = scratch
        columns.append((0, 0) if g is None else ((g if scratch is None else scratch).data_ptr(), 1))
    table[:, [1, 5]] = torch.tensor(columns, dtype=torch.int64).reshape(-1, 2)
    return relayout
