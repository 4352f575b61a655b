"""Backend "triton": the fused Triton kernels of `lookahead_fused.triton_kernels`.

A step is one launch of `lookahead_step_kernel` per bucket: the inner SGD / Adam / AdamW
update of every tensor of the bucket and, on a sync step, the slow-weight lerp, the reset of
the fast weights and the inner-state policy in the same pass; then one tiny launch that
advances the counters (kernels read them, so they cannot also write them: see
triton_kernels/lookahead.py). Adaptive α costs one extra pass on sync steps: the first pass
does the inner step and per-program partial sums of gᵀd and dᵀÂd, the group's α̂ is
formed from them on the device, and a second pass does the sync with it (reading θ and φ
again). On the device path, where the host does not know which steps sync, every step of an
adaptive-α group makes both launches and the few α̂ ops; on a plain step the second launch
finds nothing to do and moves no memory.

The kernels reach parameters and gradients through tables kept in `bucket.backend_cache`:
a chunk table (one row per program: parameter address, numel, state offset, counter slot),
rebuilt only when a parameter changes address or size, and a gradient-address vector,
rebuilt only when a gradient does (a few recent ones are kept, so a parameter whose
gradient comes and goes reuses them). Gradients whose strides differ from their parameter's
are copied, each step, into a scratch tensor with the parameter's layout.

Host path (no GradScaler `found_inf`, `capturable=False`): the host knows the group's
lookahead counter (`bucket.host_count`, read from the device once when unknown), so the
kernel is specialised for a plain step (no slow-weight code at all) or a sync step.
Device path (`found_inf` given, or `capturable=True`): the counters, lr (a tensor lr stays
on the device) and the sync decision live on the device, and a step performs no host
synchronisation and no host-to-device copy once its tables exist; a step with found_inf set
changes no tensor at all.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (that is how CI runs them). On a GPU
the launch configuration is fixed by a heuristic, not autotuned: the kernels update their
arguments in place, and re-running them on live data to time configurations would corrupt
the state. The kernels cover fp32, bf16 and fp16 parameters (math in fp32, state and slow
weights of any float dtype) that are dense (they walk a parameter and its state side by side
in memory); a group with fp64 parameters, or with a parameter that has gaps between its
elements (such as `torch.randn(10, 5, 2)[..., 0]`), is stepped by backend "foreach".
`Bucket.stepped_by` records which of the two stepped a bucket, and why (backends/_compiled.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import reference
from .._buckets import STATE_ALIGNMENT, Bucket
from . import foreach
from ._capture import capture_error, capturing, describe, keep_captured
from ._compiled import check_bucket, device_scope, fallback_reasons, grad_scratch, host_lr, record

try:
    import triton
    import triton.language as tl

    # triton_kernels/ installs as this subpackage (setup.py's package_dir): mypy sees no module.
    from lookahead_fused import triton_kernels as kernels  # type: ignore[attr-defined]
except ImportError as e:  # triton (or the kernels package) is not installed
    triton = tl = kernels = None
    _IMPORT_ERROR: str | None = f"the Triton kernels cannot be imported: {e}"
else:
    _IMPORT_ERROR = None

# Launch configuration. On a GPU: 1024 elements per block (8 per thread with 4 warps: 128-bit
# accesses for fp32) and 16 blocks per program, so ResNet-152's 60 M parameters make a few
# thousand programs; small tensors take one program each. Under the interpreter every
# operation on a block is one numpy call: large blocks make a step over 200 k elements 0.05 s
# instead of 4 s at BLOCK = 128, and a bucket of small tensors gets a block no larger than its
# largest tensor (_block). Tests that need several blocks and programs per tensor set smaller
# values: both are read at launch time (CHUNK also keys the cached chunk table).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU_BLOCK = 1024
BLOCK = 16384 if INTERPRET else GPU_BLOCK
CHUNK = 4 * BLOCK if INTERPRET else 16 * BLOCK
NUM_WARPS = 4
COUNTER_BLOCK = 128  # the counter kernel: one element per parameter

# The ALIGNED kernel variant needs every row of every tensor to start at a multiple of this
# many bytes (128-bit accesses): the alignment the buckets pad every parameter's state to;
# torch's allocations have it, views at odd offsets may not.
_ALIGNMENT = STATE_ALIGNMENT

# How many gradient-address vectors a bucket keeps (distinct sets of gradients seen lately).
_GRAD_VECTORS_KEPT = 4


def _param_dtypes() -> dict[torch.dtype, Any]:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def unavailable(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        return None if INTERPRET else "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    return f"Triton does not run on {device.type} tensors"


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    reasons = fallback_reasons("triton", buckets, _uncovered)
    if reasons is not None:
        # One counter and one adaptive α per group: the whole group takes the other path.
        foreach.step(kind, group, buckets, grads, grad_scale, found_inf)
        record(buckets, "foreach", reasons)
        return

    # Under CUDA-graph capture the device path, whatever `capturable` says: a host-decided
    # step would bake this step's sync decision into the graph and replay it forever.
    capture = capturing()
    on_device = found_inf is not None or bool(group.get("capturable", False)) or capture
    k = group["k"]
    if on_device:
        mode = kernels.SYNC_DEVICE
        syncs: bool | None = None  # decided on the device
        count = None
    else:
        count = _host_count(buckets[0]) + 1
        syncs = count % k == 0
        mode = kernels.SYNC_NOW if syncs else kernels.SYNC_NEVER

    launches = [
        _Launch(kind, group, b, gs, grad_scale, found_inf, on_device, capture)
        for b, gs in zip(buckets, grads, strict=True)
    ]
    alpha_hats: Sequence[Tensor | None] = [None] * len(launches)
    for phase in phases(kind, group, mode):
        if phase == kernels.PHASE_SYNC_ONLY:
            alpha_hats = _alpha_hat(group, launches)
        for launch, alpha_hat in zip(launches, alpha_hats):
            launch.run(phase, mode, alpha_hat)
    for launch in launches:
        launch.advance_counters(mode)
        launch.bucket.host_count = count
    record(buckets, "triton")


def _uncovered(bucket: Bucket) -> str | None:
    """Why the kernels do not cover this bucket's dtypes, or None."""
    return None if bucket.dtype in _param_dtypes() else f"the triton kernels do not cover {bucket.dtype} parameters"


def phases(kind: str, group: dict[str, Any], mode: int) -> list[int]:
    """The step kernel's launches per bucket in a step: one, or with adaptive α on a step that
    may sync two (the second with α̂ from the device, ALPHA_ON_DEVICE)."""
    if kind != "sgd" and group.get("adaptive_alpha", False) and mode != kernels.SYNC_NEVER:
        return [kernels.PHASE_INNER_DOTS, kernels.PHASE_SYNC_ONLY]
    return [kernels.PHASE_STEP]


def step_constexprs(
    kind: str,
    group: dict[str, Any],
    param_dtype: torch.dtype,
    *,
    grad_scale: bool,
    lr_on_device: bool,
    phase: int,
    mode: int,
    aligned: bool,
    block: int,
) -> dict[str, Any]:
    """The constexprs of a `lookahead_step_kernel` launch: the only place they are chosen
    (tests/test_codegen.py compiles every variant from here)."""
    momentum = group.get("momentum", 0.0)
    return dict(
        PARAM_DTYPE=_param_dtypes()[param_dtype],
        ADAM=kind != "sgd",
        DECOUPLED=kind == "adamw",
        HAS_MOMENTUM=kind == "sgd" and momentum != 0,
        NESTEROV=bool(group.get("nesterov", False)),
        MAXIMIZE=bool(group["maximize"]),
        AMSGRAD=bool(group.get("amsgrad", False)),
        INNER_STATE=kernels.INNER_STATE_CODES[group["inner_state"]],
        HAS_GRAD_SCALE=grad_scale,
        LR_ON_DEVICE=lr_on_device,
        ALPHA_ON_DEVICE=phase == kernels.PHASE_SYNC_ONLY,
        PHASE=phase,
        SYNC=mode,
        ALIGNED=aligned,
        BLOCK=block,
    )


def counter_constexprs(group: dict[str, Any], mode: int) -> dict[str, Any]:
    """The constexprs of an `advance_counters_kernel` launch."""
    return dict(SYNC=mode, RESET=group["inner_state"] == "reset", BLOCK=COUNTER_BLOCK)


def _host_count(bucket: Bucket) -> int:
    """The group's lookahead counter before this step, read from the device only when the host
    does not know it (first step, or after a device-path step or another backend's step)."""
    if bucket.host_count is None:
        bucket.host_count = int(bucket.flat["lookahead_step"][0].item()) if bucket.params else 0
    return bucket.host_count


def _alpha_hat(group: dict[str, Any], launches: list[_Launch]) -> list[Tensor]:
    """α̂ of paper §2.1 for the group, on the device: 1 + gᵀd / dᵀÂd from the partial sums of
    every program of every bucket, clipped to [alpha_low, 1]; the group's α where dᵀÂd is 0
    or not finite (reference.adaptive_alpha). Formed on the first bucket's device from the
    partials in bucket order (one reduction of one tensor: the same sum every time), and
    returned as one copy per launch on that launch's device."""
    device = launches[0].bucket.device
    with device_scope(device):
        sums = torch.cat([launch.partials.to(device) for launch in launches]).sum(0)
        g_dot_d, d_a_d = sums[0], sums[1]
        alpha_hat = (1 + g_dot_d / d_a_d).clamp(group["alpha_low"], 1.0)
        alpha_hat = torch.where((d_a_d != 0) & d_a_d.isfinite(), alpha_hat, group["alpha"]).to(torch.float32)
    return [alpha_hat.to(launch.bucket.device) for launch in launches]


class _Launch:
    """The arguments of one bucket's launches in one step."""

    def __init__(
        self,
        kind: str,
        group: dict[str, Any],
        bucket: Bucket,
        grads: list[Tensor | None],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        on_device: bool,
        capture: bool = False,
    ) -> None:
        self.bucket = bucket
        cache = bucket.backend_cache
        self.table, rows_aligned = _chunk_table(bucket, capture)
        self.grad_addresses, grads_aligned = _grad_addresses(bucket, grads, capture)
        device = bucket.device
        if "triton_zero" not in cache:  # found_inf when there is none; any dummy pointer
            cache["triton_zero"] = torch.zeros((), dtype=torch.float32, device=device)
        zero = cache["triton_zero"]
        if "triton_partials" not in cache or cache["triton_partials"].shape[0] != self.table.shape[0]:
            cache["triton_partials"] = torch.zeros(self.table.shape[0], 2, dtype=torch.float64, device=device)
        self.partials = cache["triton_partials"]
        if capture:  # a graph reads these for its whole life: later steps must not free them
            keep_captured(cache, "triton_captured", self.table, self.partials, zero)
        self.found_inf = zero if found_inf is None else found_inf.to(device)
        self.k = group["k"]

        flat = bucket.flat
        momentum_key = reference.MOMENTUM_KEY[kind]
        state = lambda key: flat.get(key, zero)  # noqa: E731  absent entries are never dereferenced
        lr = group["lr"]
        host_value = host_lr(lr, device, capture)  # None: a tensor on a device
        lr_on_device = on_device and host_value is None
        lr_value = 0.0 if lr_on_device else float(lr)  # a tensor lr is read here on the host path
        beta1, beta2 = group.get("betas", (0.0, 0.0))
        momentum = group.get("momentum", 0.0)
        self.pointers = dict(
            table_ptr=self.table,
            grad_address_ptr=self.grad_addresses,
            momentum_ptr=state(momentum_key),
            exp_avg_sq_ptr=state("exp_avg_sq"),
            max_exp_avg_sq_ptr=state("max_exp_avg_sq"),
            cached_ptr=state("cached_" + momentum_key),
            slow_ptr=flat["slow_weights"],
            step_ptr=flat["step"],
            lookahead_ptr=flat["lookahead_step"],
            found_inf_ptr=self.found_inf,
            grad_scale_ptr=zero if grad_scale is None else grad_scale.to(device),
            lr_ptr=lr.to(device) if lr_on_device else zero,
            partial_ptr=self.partials,
        )
        self.scalars = dict(
            lr=lr_value,
            weight_decay=float(group["weight_decay"]),
            momentum=float(momentum),
            one_minus_dampening=1.0 - group.get("dampening", 0.0),
            log_beta1=_log(beta1),
            log_beta2=_log(beta2),
            one_minus_beta1=1.0 - beta1,
            beta2=float(beta2),
            one_minus_beta2=1.0 - beta2,
            eps=float(group.get("eps", 0.0)),
            k=self.k,
        )
        # 128-bit accesses need every row to start 16-byte aligned in every tensor it touches:
        # the rows' offsets (checked with the table) and the buffers' bases, here, since a
        # state buffer may be replaced without the table changing.
        buffers = ("momentum_ptr", "exp_avg_sq_ptr", "max_exp_avg_sq_ptr", "cached_ptr", "slow_ptr")
        bases = [self.pointers[key] for key in buffers]
        aligned = rows_aligned and grads_aligned and all(t.data_ptr() % _ALIGNMENT == 0 for t in bases)
        self.kind, self.group, self.grad_scale, self.lr_on_device, self.aligned = (
            kind, group, grad_scale is not None, lr_on_device, aligned
        )  # fmt: skip
        self.alpha = float(group["alpha"])

    def run(self, phase: int, mode: int, alpha: Tensor | None = None) -> None:
        programs = self.table.shape[0]
        if programs == 0:
            return  # only empty tensors
        constexprs = step_constexprs(
            self.kind, self.group, self.bucket.dtype, grad_scale=self.grad_scale, lr_on_device=self.lr_on_device,
            phase=phase, mode=mode, aligned=self.aligned, block=_block(self.bucket),
        )  # fmt: skip
        with device_scope(self.bucket.device):
            kernels.lookahead_step_kernel[(programs,)](
                **self.pointers,
                alpha_ptr=self.found_inf if alpha is None else alpha,
                alpha=self.alpha,
                **self.scalars,
                **constexprs,
                num_warps=NUM_WARPS,
            )

    def advance_counters(self, mode: int) -> None:
        n = len(self.bucket.params)
        if n == 0:
            return
        flat = self.bucket.flat
        with device_scope(self.bucket.device):
            kernels.advance_counters_kernel[(triton.cdiv(n, COUNTER_BLOCK),)](
                flat["step"], flat["lookahead_step"], self.grad_addresses, self.found_inf, n, self.k,
                **counter_constexprs(self.group, mode),
            )  # fmt: skip


def _block(bucket: Bucket) -> int:
    """BLOCK, or under the interpreter the smallest power of two that holds the bucket's
    largest tensor if that is smaller (every block operation costs the same numpy overhead)."""
    if not INTERPRET:
        return BLOCK
    largest = max((p.numel() for p in bucket.params), default=1)
    return min(BLOCK, max(16, triton.next_power_of_2(largest)))


def _log(beta: float) -> float:
    """log β for the bias corrections 1 − β^step = 1 − exp(step · log β); β = 0 gives −inf
    and a correction of exactly 1."""
    return math.log(beta) if beta > 0 else float("-inf")


# ---------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------


def _chunk_table(b: Bucket, capture: bool = False) -> tuple[Tensor, bool]:
    """The bucket's chunk table (triton_kernels/lookahead.py), rebuilt only when a parameter's
    address or size changes (`.data` replaced, `model.half()`), and whether every row starts
    16-byte aligned in the parameter and in the state and slow buffers (given aligned bases).
    Under capture a rebuild is an error that says what moved (backends/_compiled.capture_error)."""
    cache = b.backend_cache
    key = (b.param_version, CHUNK)  # bumped by Bucket.moved when an address or size changes
    if cache.get("triton_table_key") != key:
        if capture:
            raise capture_error("triton", b, cache.get("triton_layout"), list(b.params), "parameter")
        cache["triton_table"] = _build_chunk_table(b)
        cache["triton_layout"] = describe(list(b.params))
        cache["triton_table_key"] = key
        cache["builds"] = cache.get("builds", 0) + 1  # tests check that tables are reused
    return cache["triton_table"]


def _build_chunk_table(b: Bucket) -> tuple[Tensor, bool]:
    check_bucket("triton", b)
    rows = []
    state_sizes = {b.state_dtype.itemsize, b.slow_dtype.itemsize}  # offsets index the flat state
    aligned = all(CHUNK * s % _ALIGNMENT == 0 for s in {b.dtype.itemsize, *state_sizes})
    for i, (p, offset) in enumerate(zip(b.params, b.offsets)):
        address, size = p.data_ptr(), p.element_size()
        if p.numel():
            aligned &= address % _ALIGNMENT == 0 and all(offset * s % _ALIGNMENT == 0 for s in state_sizes)
        for first in range(0, p.numel(), CHUNK):
            rows.append((address + first * size, first, min(CHUNK, p.numel() - first), offset + first, i))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, kernels.TABLE_COLUMNS)
    return table.to(b.device), aligned


def _grad_addresses(b: Bucket, grads: list[Tensor | None], capture: bool = False) -> tuple[Tensor, bool]:
    """The gradient-address vector (0 where a parameter has no gradient) and whether every
    gradient read starts 16-byte aligned. Gradients laid out unlike their parameter (other
    strides or dtype) are copied into a scratch tensor with the parameter's layout, every
    step, and the vector points at the scratch. Under capture a vector that is not kept
    already is an error that says which gradient moved; one that is stays referenced for the
    bucket's life, so that evicting it from the few kept here cannot free what a graph reads."""
    cache = b.backend_cache
    kept: dict[tuple, tuple[Tensor, dict[int, Tensor], bool, list]] = cache.setdefault("triton_grads", {})
    # Bucket.grads: addresses, shapes, strides, dtypes (None: not keyable); and the parameters'
    # layout version, since whether a gradient is read in place or through a scratch copy in its
    # parameter's order depends on the parameter's strides too (a gradient kept across `.data`
    # re-laid out would otherwise be read in the old order).
    key = None if b.grad_key is None else (b.param_version, b.grad_key)
    if capture and (key is None or key not in kept):
        last = kept.get(cache.get("triton_grads_last"))  # type: ignore[arg-type]
        raise capture_error("triton", b, None if last is None else last[3], grads, "gradient")
    if key is None:  # nothing to key it by: built afresh, not kept
        vector, relayout, aligned, _ = _build_grad_addresses(b, grads)
    else:
        if key not in kept:
            if len(kept) >= _GRAD_VECTORS_KEPT:
                kept.pop(next(iter(kept)))  # the oldest
            kept[key] = _build_grad_addresses(b, grads)
        vector, relayout, aligned, _ = kept[key]
        cache["triton_grads_last"] = key
    if capture:
        keep_captured(cache, "triton_captured", vector, *relayout.values())
    for i, scratch in relayout.items():
        scratch.copy_(cast(Tensor, grads[i]))  # a relayout entry is a gradient, never None
    return vector, aligned


def _build_grad_addresses(b: Bucket, grads: list[Tensor | None]) -> tuple[Tensor, dict[int, Tensor], bool, list]:
    addresses = []
    aligned = True
    relayout: dict[int, Tensor] = {}
    for i, (p, g) in enumerate(zip(b.params, grads, strict=True)):
        if g is None:
            addresses.append(0)
        elif g.numel() == 0:
            addresses.append(1)  # has a gradient (the counters advance) but nothing to read
        else:
            scratch = grad_scratch("triton", i, p, g)
            if scratch is not None:
                relayout[i] = scratch
            addresses.append((g if scratch is None else scratch).data_ptr())
            aligned &= addresses[-1] % _ALIGNMENT == 0
    return torch.tensor(addresses, dtype=torch.int64).to(b.device), relayout, aligned, describe(grads)
