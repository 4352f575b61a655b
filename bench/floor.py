"""The bandwidth floor: what one optimizer step cannot beat on this device.

`FloorCycle` streams fp32 buffers with an optimizer step's pattern of accesses: it reads them
all and writes some of them back in place. Its destinations are read anyway, as an
optimizer's are, so it counts no read-for-ownership that the optimizer would not pay: a plain
copy or triad would understate the floor. `python -m bench` times it beside the optimizers,
interleaved, as the "floor" row of each family. On the CPU the kernel is `_C.stream_floor`
(the optimizer kernels' OpenMP chunking); on a GPU it is `_stream` below, in Triton, which
the tests run under the Triton interpreter.

The kernels stream fp32 only. For bf16 (or fp16) parameters the step is modelled with the
same bytes in two passes: θ and g as fp32 buffers of half the length (θ read and written,
g read), then the fp32 state (and φ on a sync step) over the full length. The bytes match
the fused step's exactly; the number of concurrent streams does not, which matters little
to a bandwidth-bound pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lookahead_fused.backends.cpu import CHUNK

try:
    from lookahead_fused import _C
except ImportError:  # the GPU floor needs no _C
    _C = None
try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU floor needs no Triton
    triton = None

# fp32 state buffers per parameter (read and written every step): Adam's m and v, SGD's
# momentum buffer. Every step also reads θ and g and writes θ; a sync step also reads and
# writes the slow weights φ (DESIGN §4).
STATE_BUFFERS = {"adam": 2, "adamw": 2, "sgd": 1}

Pass = tuple[int, int, int]  # (buffers read, of them written back, elements of each)


def passes(n: int, family: str, param_dtype: torch.dtype, sync: bool) -> list[Pass]:
    """The streaming passes with one step's accesses over n parameters."""
    state = STATE_BUFFERS[family] + sync  # fp32 buffers read and written besides θ and g
    itemsize = param_dtype.itemsize
    if itemsize == 4:
        return [(2 + state, 1 + state, n)]
    return [(2, 1, -(-n * itemsize // 4)), (state, state, n)]


MAX_STREAMS = 5  # Adam's sync step: θ, g, m, v, φ

if triton is not None:

    @triton.jit
    def _stream(p0, p1, p2, p3, p4, n, scale, mix, READS: tl.constexpr, WRITES: tl.constexpr, BLOCK: tl.constexpr):
        """Read READS fp32 buffers, write the first WRITES back: x ← scale·x + mix·Σ(all read).
        scale and mix are run-time arguments (1 and 0 in the benchmark), so no load or store
        can be optimised away."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x0 = tl.load(p0 + offs, mask=mask)
        total = x0
        if READS > 1:
            x1 = tl.load(p1 + offs, mask=mask)
            total += x1
        if READS > 2:
            x2 = tl.load(p2 + offs, mask=mask)
            total += x2
        if READS > 3:
            x3 = tl.load(p3 + offs, mask=mask)
            total += x3
        if READS > 4:
            x4 = tl.load(p4 + offs, mask=mask)
            total += x4
        if WRITES > 0:
            tl.store(p0 + offs, scale * x0 + mix * total, mask=mask)
        if WRITES > 1:
            tl.store(p1 + offs, scale * x1 + mix * total, mask=mask)
        if WRITES > 2:
            tl.store(p2 + offs, scale * x2 + mix * total, mask=mask)
        if WRITES > 3:
            tl.store(p3 + offs, scale * x3 + mix * total, mask=mask)
        if WRITES > 4:
            tl.store(p4 + offs, scale * x4 + mix * total, mask=mask)


def triton_stream(buffers: list[Tensor], writes: int, scale: float = 1.0, mix: float = 0.0, block: int = 2048) -> None:
    """One streaming pass of the Triton floor kernel over equal-length fp32 buffers."""
    if triton is None:
        raise RuntimeError("the GPU floor kernel needs Triton")
    if not 1 <= len(buffers) <= MAX_STREAMS or not 0 <= writes <= len(buffers):
        raise ValueError(f"1 to {MAX_STREAMS} buffers and at most as many writes, got {len(buffers)} and {writes}")
    n = buffers[0].numel()
    if any(b.dtype != torch.float32 or b.numel() != n or not b.is_contiguous() for b in buffers):
        raise ValueError("the floor kernel streams contiguous fp32 buffers of one length")
    pointers = buffers + [buffers[0]] * (MAX_STREAMS - len(buffers))  # unused slots: never read
    grid = (triton.cdiv(n, block),)
    _stream[grid](*pointers, n, scale, mix, READS=len(buffers), WRITES=writes, BLOCK=block)


class FloorCycle:
    """A stand-in optimizer whose step() streams the optimizer's bytes over n parameters:
    plain steps, and with lookahead=True every k-th step a sync step. The benchmark times it
    beside the optimizers: the bandwidth floor, measured in the same run. On CUDA (or with
    `use_triton=True`, e.g. CPU tensors under TRITON_INTERPRET=1) the Triton kernel streams,
    otherwise `_C.stream_floor`."""

    def __init__(
        self,
        n: int,
        family: str,
        k: int,
        lookahead: bool,
        param_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        use_triton: bool | None = None,
    ) -> None:
        device = torch.device(device)
        self.plain = passes(n, family, param_dtype, sync=False)
        self.sync = passes(n, family, param_dtype, sync=lookahead)
        # One set of buffers per pass position, as long and as many as the sync step needs.
        self.buffers = [[torch.rand(numel, device=device) for _ in range(reads)] for reads, _, numel in self.sync]
        self.k, self.count = k, 0
        self.triton = device.type == "cuda" if use_triton is None else use_triton
        if not self.triton and _C is None:
            raise RuntimeError("the CPU floor kernel needs lookahead_fused._C")
        self.addresses = [[b.data_ptr() for b in buffers] for buffers in self.buffers]

    def step(self) -> None:
        self.count += 1
        for i, (reads, writes, numel) in enumerate(self.sync if self.count % self.k == 0 else self.plain):
            if self.triton:
                triton_stream(self.buffers[i][:reads], writes)
            else:
                _C.stream_floor(self.addresses[i][:reads], writes, numel, CHUNK)
