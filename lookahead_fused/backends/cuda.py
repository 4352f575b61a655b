"""Backend "cuda": the hand-written CUDA kernels of `lookahead_fused._C` (csrc/cuda/).

One launch per bucket per step does the inner SGD / Adam / AdamW update and, on a sync step,
the lerp of the slow weights, the reset of the fast ones and the inner-state policy; a
one-block kernel then advances the bucket's counters (csrc/cuda/lookahead_kernels.cu explains
why the counters move in a launch of their own). The kernels decide on the device whether a
step syncs, read GradScaler's `grad_scale` / `found_inf` and a tensor `lr` on the device, and
compute adaptive α in a deterministic two-stage reduction on the device. So `step()` never
waits for the GPU and never copies host data to it, once the tables below are built:
capturable in a CUDA graph whether or not `capturable=True` was asked for.

Tables, built here and kept in `bucket.backend_cache`:
- the segment table (one row per parameter: param address, grad address, numel, offset in
  the flat state, counter slot, has-grad; the layout of csrc/cpu_kernels.h) and the chunk
  table (segment, start) of chunks that never span two parameters, both int64 tensors on
  the bucket's device. The chunk table is built when a parameter changes address or size,
  by `plan_chunks` (a pure function of the parameter sizes and the grid, tested on its own by
  tests/test_cuda_balance.py): its chunk size and row order balance the blocks' work;
  a segment table exists per layout of the parameters and gradients (a few recent layouts
  are kept, by the key of Bucket.grads), so double-buffered gradients or
  `zero_grad(set_to_none=True)` with an allocator that hands the same blocks back reuse
  tables. A table goes to the device through a pinned staging buffer, copied with
  `non_blocking=True` on the current stream (an event says when the staging buffer may be
  written again; until then a new one is taken);
- for adaptive α, per device of the group: a buffer of per-block partial sums and α̂ (fp64),
  kept by the group's first bucket on that device.

CUDA graphs: a graph holds the addresses of the tables its capture launched with. Tables are
never written after they are built (copy-on-write: a step that needs other tables builds new
ones), and those used while a capture is under way are kept in `backend_cache["cuda_captured"]`
for the bucket's life. During a capture a step that would need a new table (a parameter or a
gradient that moved since the warm-up steps) raises a RuntimeError that says what changed,
before anything is launched: building a table is a host-to-device copy, which capture forbids.
A bucket rebuilt by the front-end (new parameters in the group, `load_state_dict`, a dtype or
device change) has new state buffers too: a graph captured before it is stale.

The same module drives backend "cuda_emulated" (backends/cuda_emulated.py): the same kernel
source compiled for the host, run on CPU tensors with a small grid; only the entry points,
the device type and the launch shape differ (`_Target`).

What the kernels compile: parameters in fp32, bf16 or fp16, math in fp32, state and slow
weights each in fp32 or the parameter's dtype, of dense parameters (the kernels walk a
parameter and its state side by side in memory). A group with anything else (other dtypes,
or a parameter with gaps between its elements, such as `torch.randn(10, 5, 2)[..., 0]`) goes
to the "foreach" backend, which handles every dtype and layout on every device with the same
semantics; `Bucket.stepped_by` records which of the two stepped a bucket, and why
(backends/_compiled.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from .._buckets import Bucket
from . import foreach
from ._capture import capture_error, describe, keep_captured
from ._capture import capturing as capturing_now
from ._compiled import check_bucket, device_scope, fallback_reasons, grad_scratch, host_lr, record, set_bucket_args

try:
    from .. import _C  # type: ignore[attr-defined]  # compiled (pybind11): mypy sees no module
except ImportError as e:  # the compiled core is not built (e.g. a source checkout)
    _C = None
    _IMPORT_ERROR: str | None = f"lookahead_fused._C is not built: {e}"
else:
    _IMPORT_ERROR = None

_SEGMENT_COLUMNS = 6  # csrc/cpu_kernels.h: struct Segment
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_TABLES_KEPT = 4  # segment tables kept per bucket, by layout of parameters and gradients


@dataclass(frozen=True)
class _Target:
    """What differs between the GPU build and the host emulation of the same kernels."""

    name: str
    device_type: str
    prefix: str  # of the _C entry points: "<prefix>step", "<prefix>finalize_alpha"
    chunk_size: int  # the largest chunk, in elements (a multiple of the vector width, 4)
    block: int  # threads per block (a power of two, at most 256)
    max_grid: Callable[[torch.device], int]
    stream: Callable[[torch.device], int]  # the handle of the device's current stream
    index: Callable[[torch.device], int] = lambda device: device.index if device.index is not None else 0
    # The smallest chunk plan_chunks may choose, and the step between its choices (a multiple
    # of 4); None: always chunk_size.
    min_chunk: int | None = None

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
    index=_index,
    min_chunk=4 * 256,  # one 128-bit vector per thread of the block
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
    reasons = fallback_reasons(target.name, buckets, functools.partial(_uncovered, target))
    if reasons is not None:
        # One counter and one adaptive α per group: the whole group takes the other path.
        foreach.step(kind, group, buckets, grads, grad_scale, found_inf)
        record(buckets, "foreach", reasons)
        return
    capturing = capturing_now()
    # Every table is ready (or an error raised) before the first launch.
    launches = [
        _launch_args(target, kind, group, b, gs, grad_scale, found_inf, capturing) for b, gs in zip(buckets, grads)
    ]
    with device_scope(buckets[0].device):
        if group.get("adaptive_alpha", False):
            _adaptive_step(target, group, buckets, launches, capturing)
        else:
            launch = target.entry("step")
            for a in launches:
                launch(a)
    for b in buckets:
        b.host_count = None  # the counters moved on the device
    record(buckets, target.name)


def _adaptive_step(target: _Target, group: dict[str, Any], buckets: list[Bucket], launches: list[Any],
                   capturing: bool) -> None:  # fmt: skip
    """Adaptive α over a group that may span several devices. Pass 1 (inner step and, on a
    sync step, per-block gᵀd and dᵀÂd) writes each bucket's partial sums on its own device, in
    its own stream. The group's first device holds a buffer of every block's partials in
    launch order: its buckets write there directly, the other devices' partials are copied in
    (torch orders a copy between devices after the work queued on both current streams). The
    finalize runs there, on that buffer, as it would for a group on one device (the same
    numbers, in the same order: the same α̂ bit for bit); α̂ is copied back to each other
    device before its buckets' pass 2 (the sync with α̂, then the counters)."""
    launch = target.entry("step")
    home = buckets[0].device
    keeper: dict[torch.device, Bucket] = {}  # the first bucket on each device keeps its buffers
    need: dict[torch.device, int] = {}
    for b, a in zip(buckets, launches):
        keeper.setdefault(b.device, b)
        need[b.device] = need.get(b.device, 0) + 2 * a.grid
    total = sum(need.values())
    need[home] = total
    buffers = {d: _alpha_buffers(keeper[d], n, capturing) for d, n in need.items()}
    gather: list[tuple[Tensor, Tensor]] = []
    offset, local = 0, dict.fromkeys(need, 0)
    for b, a in zip(buckets, launches):
        n = 2 * a.grid
        if b.device == home:
            out = buffers[home][0][offset : offset + n]
        else:
            out = buffers[b.device][0][local[b.device] : local[b.device] + n]
            local[b.device] += n
            gather.append((buffers[home][0][offset : offset + n], out))
        a.phase, a.partials, a.advance_counters = _C.LaunchPhase.inner_dots, out.data_ptr(), False
        launch(a)
        offset += n
    for whole, part in gather:
        whole.copy_(part)
    partials, alpha_hat = buffers[home]
    f = _C.FinalizeArgs()
    f.partials, f.num_partials, f.alpha_out = partials.data_ptr(), total // 2, alpha_hat.data_ptr()
    f.alpha, f.alpha_low = group["alpha"], group["alpha_low"]
    f.stream, f.device = target.stream(home), target.index(home)
    target.entry("finalize_alpha")(f)
    for device, (_, alpha) in buffers.items():
        if device != home:
            alpha.copy_(alpha_hat)
    for b, a in zip(buckets, launches):
        a.phase, a.alpha_ptr, a.advance_counters = _C.LaunchPhase.sync_only, buffers[b.device][1].data_ptr(), True
        launch(a)


def _compiled(bucket: Bucket) -> bool:
    """Whether the kernels cover this bucket's dtypes (see the module docstring)."""
    own = (torch.float32, bucket.dtype)
    return bucket.dtype in _SUPPORTED and bucket.state_dtype in own and bucket.slow_dtype in own


def _uncovered(target: _Target, bucket: Bucket) -> str | None:
    """Why the kernels do not cover this bucket's dtypes, or None."""
    if _compiled(bucket):
        return None
    return (
        f"the {target.name} kernels do not cover {bucket.dtype} parameters with {bucket.state_dtype} state "
        f"and {bucket.slow_dtype} slow weights"
    )


def _device_scalar(t: Tensor | None, b: Bucket, what: str) -> int:
    """Address of GradScaler's one-element fp32 tensor on the bucket's device (0 for None).
    GradScaler keeps one per device; another device's is copied, as torch's fused optimizers
    do, into a buffer of the bucket's on its current stream (torch orders a copy between
    devices after the work queued on both devices' current streams)."""
    if t is None:
        return 0
    if t.numel() != 1 or t.dtype != torch.float32:
        raise RuntimeError(f"{what} must be a one-element float32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != b.device:
        buf = b.backend_cache.get("cuda_" + what)
        if buf is None:
            buf = b.backend_cache["cuda_" + what] = torch.empty((), dtype=torch.float32, device=b.device)
        buf.copy_(t.reshape(()))
        t = buf
    return t.data_ptr()


def _launch_args(
    target: _Target,
    kind: str,
    group: dict[str, Any],
    b: Bucket,
    grads: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    capturing: bool = False,
) -> Any:
    tables = _tables(target, b, grads, capturing)
    segments, chunks = tables.segments, tables.chunks
    a = _C.LaunchArgs()
    a.segments, a.num_segments = segments.data_ptr(), segments.shape[0]
    a.chunks, a.num_chunks, a.chunk_size = chunks.data_ptr(), chunks.shape[0], tables.chunk_size
    a.grid, a.block = tables.grid, target.block
    a.phase = _C.LaunchPhase.step
    set_bucket_args(a, kind, group, b)
    a.lookahead_step = b.flat["lookahead_step"].data_ptr()
    lr = group["lr"]
    value = host_lr(lr, b.device, capturing)
    if value is None:  # a tensor on a device, read by the kernel: capturable, and no host sync
        if lr.device != b.device or lr.dtype not in (torch.float32, torch.float64):
            lr = _lr_on_device(b, lr)
        a.lr_ptr, a.lr_is_double = lr.data_ptr(), lr.dtype == torch.float64
    else:
        a.lr = value
    a.grad_scale_ptr = _device_scalar(grad_scale, b, "grad_scale")
    a.found_inf_ptr = _device_scalar(found_inf, b, "found_inf")
    a.alpha, a.k = group["alpha"], group["k"]
    a.stream = target.stream(b.device)
    a.device = target.index(b.device)
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


def _alpha_buffers(keeper: Bucket, need: int, capturing: bool) -> tuple[Tensor, Tensor]:
    """The partial-sum buffer (at least `need` fp64) and α̂ of one device of a group, kept by
    the group's first bucket on that device; grown when too small (buffers a capture used
    stay referenced)."""
    cache = keeper.backend_cache
    partials = cache.get("cuda_alpha_partials")
    if partials is None or partials.numel() < need:
        partials = cache["cuda_alpha_partials"] = torch.zeros(need, dtype=torch.float64, device=keeper.device)
        cache["cuda_alpha_hat"] = torch.zeros((), dtype=torch.float64, device=keeper.device)
    pair = (partials, cache["cuda_alpha_hat"])
    if capturing:
        keep_captured(cache, "cuda_captured", *pair)
    return pair


# ---------------------------------------------------------------------------------------
# Segment and chunk tables.
# ---------------------------------------------------------------------------------------


@dataclass
class _Tables:
    """One layout's tables on the device; never written after they are built."""

    segments: Tensor
    chunks: Tensor
    grid: int
    chunk_size: int
    relayout: dict[int, Tensor]  # parameter index -> scratch its gradient is copied into
    grads: list[tuple | None]  # what each gradient was (address, shape, strides), for messages


@dataclass
class _Staging:
    """Pinned host memory for the tables' host-to-device copies, reused once the event
    recorded after its last copy has completed (else a new buffer is taken: torch's pinned
    allocator keeps the old one until its copy is done). The copy to the device is
    asynchronous: the host never waits for the device here (tests/test_capturable.py runs this
    under tests/nosync.py's upload check, with the device-specific callees below replaced)."""

    buffer: Tensor | None = None
    event: Any = None  # torch.cuda.Event

    def upload(self, host: Tensor, device: torch.device) -> Tensor:
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        if device.type == "cpu":  # cuda_emulated: the host is the device
            out.copy_(host)
            return out
        n = host.numel()
        busy = self.event is not None and not self.event.query()
        if self.buffer is None or self.buffer.numel() < n or busy:
            self.buffer = _pinned_empty(max(n, 1), host.dtype)
        staged = self.buffer[:n].view(host.shape)
        staged.copy_(host)
        out.copy_(staged, non_blocking=True)
        self.event = _new_event()
        self.event.record(_current_stream(device))
        return out


# The device-specific callees of _Staging.upload (tests replace them to run it without a GPU).
def _pinned_empty(n: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(n, dtype=dtype, pin_memory=True)


def _new_event() -> Any:
    return torch.cuda.Event()


def _current_stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device)


def _tables(target: _Target, b: Bucket, grads: list[Tensor | None], capturing: bool = False) -> _Tables:
    """The bucket's tables (segment table, chunk table, grid, chunk size) on its device for this step's
    parameters and gradients: the front-end's checks bump the bucket's versions and keys
    (Bucket.moved, Bucket.grads)."""
    cache = b.backend_cache
    param_key = (target.name, b.param_version)
    if cache.get("cuda_param_key") != param_key:
        if capturing:
            raise capture_error("cuda", b, cache.get("cuda_layout"), list(b.params), "parameter")
        rows, plan = _build_rows(target, b)
        staging = cache.setdefault("cuda_staging", _Staging())
        cache["cuda_rows"] = rows  # host rows, gradient columns empty: the template of every table
        cache["cuda_chunks"] = staging.upload(plan.table(), b.device)
        cache["cuda_grid"], cache["cuda_chunk_size"] = plan.grid, plan.chunk_size
        cache["cuda_layout"] = describe(list(b.params))
        cache["cuda_param_key"], cache["cuda_tables"] = param_key, {}
        cache["cuda_builds"] = cache.get("cuda_builds", 0) + 1  # tests check that tables are reused
    key = (param_key, b.grad_key if b.grad_key is not None else ("version", b.grad_version))
    kept: dict[tuple, _Tables] = cache["cuda_tables"]
    tables = kept.get(key)
    if tables is None:
        tables = next((t for k, t in cache.get("cuda_captured_tables", ()) if k == key), None)
    if tables is None:
        if capturing:
            last: _Tables | None = cache.get("cuda_last_tables")
            raise capture_error("cuda", b, None if last is None else last.grads, grads, "gradient")
        tables = _build_tables(target, b, grads, cache)
        if len(kept) >= _TABLES_KEPT:
            kept.pop(next(iter(kept)))  # the oldest; a graph that used it keeps it (cuda_captured)
        kept[key] = tables
    if capturing:
        keep_captured(cache, "cuda_captured", tables.segments, tables.chunks, *tables.relayout.values())
        captured_tables = cache.setdefault("cuda_captured_tables", [])
        if not any(t is tables for _, t in captured_tables):
            captured_tables.append((key, tables))
    # This step's tables under fixed keys (tests, and the emulation's address checks, read them).
    cache["cuda_segments"], cache["cuda_relayout"], cache["cuda_last_tables"] = tables.segments, tables.relayout, tables
    # Gradients whose strides differ from their parameter's are copied, every step, into a
    # scratch tensor with the parameter's layout (the table points at the scratch).
    for i, scratch in tables.relayout.items():
        scratch.copy_(cast(Tensor, grads[i]))  # a relayout entry is a gradient, never None
    return tables


def _build_tables(target: _Target, b: Bucket, grads: list[Tensor | None], cache: dict[str, Any]) -> _Tables:
    rows = cache["cuda_rows"].clone()
    relayout = _set_grads(target, b, rows, grads)
    segments = cache["cuda_staging"].upload(rows, b.device)
    cache["cuda_grad_builds"] = cache.get("cuda_grad_builds", 0) + 1
    return _Tables(
        segments, cache["cuda_chunks"], cache["cuda_grid"], cache["cuda_chunk_size"], relayout, describe(grads)
    )


def _build_rows(target: _Target, b: Bucket) -> tuple[Tensor, ChunkPlan]:
    """Segment rows (gradient columns empty) and the chunk plan, on the host."""
    check_bucket(target.name, b)
    rows = [(p.data_ptr(), 0, p.numel(), offset, i, 0) for i, (p, offset) in enumerate(zip(b.params, b.offsets))]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _SEGMENT_COLUMNS)
    plan = plan_chunks([p.numel() for p in b.params], target.max_grid(b.device), target.chunk_size, target.min_chunk)
    return table, plan


# ---------------------------------------------------------------------------------------
# Balanced work distribution: the chunk size and the order of the chunk table.
# ---------------------------------------------------------------------------------------

# The work of one chunk besides its elements, in elements' worth: its rows and counters read
# one after another (dependent loads) and its bias corrections, a few hundred nanoseconds per
# block, about what a block streams of a few hundred elements in that time.
CHUNK_OVERHEAD = 512
# Chunks per block the planner aims at (each one tried; the most balanced wins): fewer means
# less overhead, more means finer granularity.
_CHUNKS_PER_BLOCK = (4, 6, 8, 12, 16)


@dataclass(frozen=True)
class ChunkPlan:
    """A launch's chunk table: rows (segment, start) in table order, block b taking rows b,
    b + grid, b + 2 grid, ... (the kernel's loop); each chunk is [start, start + chunk_size)
    of its parameter, cut at the parameter's end."""

    sizes: tuple[int, ...]  # elements of each parameter (segment)
    rows: tuple[tuple[int, int], ...]
    chunk_size: int
    grid: int

    def table(self) -> Tensor:
        return torch.tensor(self.rows, dtype=torch.int64).reshape(-1, 2)

    def length(self, row: tuple[int, int]) -> int:
        segment, start = row
        return min(self.chunk_size, self.sizes[segment] - start)

    def block_work(self, overhead: int = CHUNK_OVERHEAD) -> list[int]:
        """Each block's work: the elements of its chunks plus `overhead` per chunk."""
        work = [0] * self.grid
        for k, row in enumerate(self.rows):
            work[k % self.grid] += self.length(row) + overhead
        return work

    def imbalance(self, overhead: int = CHUNK_OVERHEAD) -> float:
        """max / mean of block_work (1.0: perfectly balanced)."""
        work = self.block_work(overhead)
        total = sum(work)
        return max(work) * len(work) / total if total else 1.0


def plan_chunks(
    sizes: Sequence[int], max_grid: int, max_chunk: int, min_chunk: int | None = None, overhead: int = CHUNK_OVERHEAD
) -> ChunkPlan:
    """The chunk table and grid for parameters of `sizes` elements on a device that runs
    `max_grid` blocks at once (a pure function: the backend and tests/test_cuda_balance.py call it).

    Chunks never span two parameters and start at multiples of the chunk size, itself a multiple
    of `min_chunk` (and of the vector width 4) between min_chunk and max_chunk. For each chunk
    size that gives about 4-16 chunks per block, the chunks are dealt in rounds of `grid`
    (the kernel's round-robin: every block takes one chunk per round), largest first, each
    round's largest chunks to the blocks with the least work so far (LPT greedy in rounds);
    block labels are then ordered so that the blocks of a short last round come first. The
    chunk size whose busiest block has the least work (elements + `overhead` per chunk) wins.
    The same sizes give the same plan."""
    min_chunk = max_chunk if min_chunk is None else min_chunk
    if min_chunk <= 0 or min_chunk % 4 or max_chunk % min_chunk:
        raise ValueError(f"chunk sizes must be multiples of 4, max_chunk of min_chunk (got {min_chunk}, {max_chunk})")
    sizes = tuple(int(n) for n in sizes)
    total = sum(sizes)
    candidates = set()
    for per_block in _CHUNKS_PER_BLOCK:
        want = -(-total // (max(1, max_grid) * per_block))
        for size in (want // min_chunk * min_chunk, -(-want // min_chunk) * min_chunk):
            candidates.add(max(min_chunk, min(max_chunk, size)))
    plans = [_deal(sizes, size, max_grid, overhead) for size in sorted(candidates, reverse=True)]
    return min(plans, key=lambda t: t[0])[1]


def _deal(sizes: tuple[int, ...], size: int, max_grid: int, overhead: int) -> tuple[int, ChunkPlan]:
    """(the busiest block's work, the plan) for one chunk size."""
    chunks = [(i, start) for i, n in enumerate(sizes) for start in range(0, n, size)]
    n = len(chunks)
    grid = max(1, min(n, max_grid))
    work = [min(size, sizes[i] - start) + overhead for i, start in chunks]
    order = sorted(range(n), key=lambda c: (-work[c], c))
    load = [0] * grid
    dealt: list[list[int]] = [[] for _ in range(grid)]
    for first in range(0, n, grid):
        blocks = sorted(range(grid), key=lambda b: (load[b], b))
        for c, b in zip(order[first : first + grid], blocks):
            dealt[b].append(c)
            load[b] += work[c]
    # Block labels: those with a chunk in a short last round first (the kernel's loop ends there).
    labels = sorted(range(grid), key=lambda b: (-len(dealt[b]), b))
    rows: list[tuple[int, int]] = [(0, 0)] * n
    for label, b in enumerate(labels):
        for r, c in enumerate(dealt[b]):
            rows[r * grid + label] = chunks[c]
    return max(load), ChunkPlan(sizes, tuple(rows), size, grid)


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
