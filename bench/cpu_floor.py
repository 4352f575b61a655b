"""The CPU bandwidth floor: what one optimizer step cannot beat on this machine.

`FloorCycle` runs `_C.stream_floor`, a streaming kernel over fp32 buffers that reads them all
and writes some of them back in place, with the same OpenMP chunking as the optimizer
kernels and an optimizer step's pattern of accesses. Its destinations are read anyway, as an
optimizer's are, so it counts no read-for-ownership that the optimizer would not pay: a plain
copy or triad would understate the floor. `python -m bench` times it beside the optimizers,
interleaved, as the "floor" row of each family.

The kernel streams fp32 only. For bf16 (or fp16) parameters the step is modelled with the
same bytes in two passes: θ and g as fp32 buffers of half the length (θ read and written,
g read), then the fp32 state (and φ on a sync step) over the full length. The bytes match
the fused step's exactly; the number of concurrent streams does not, which matters little
to a bandwidth-bound pass.
"""

from __future__ import annotations

import torch

from lookahead_fused import _C
from lookahead_fused.backends.cpu import CHUNK

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


class FloorCycle:
    """A stand-in optimizer whose step() streams the optimizer's bytes over n parameters:
    plain steps, and with lookahead=True every k-th step a sync step. The benchmark times it
    beside the optimizers: the bandwidth floor, measured in the same run."""

    def __init__(self, n: int, family: str, k: int, lookahead: bool, param_dtype: torch.dtype = torch.float32) -> None:
        self.plain = passes(n, family, param_dtype, sync=False)
        self.sync = passes(n, family, param_dtype, sync=lookahead)
        # One set of buffers per pass position, as long and as many as the sync step needs.
        self.buffers = [[torch.rand(numel) for _ in range(reads)] for reads, _, numel in self.sync]
        self.addresses = [[b.data_ptr() for b in buffers] for buffers in self.buffers]
        self.k, self.count = k, 0

    def step(self) -> None:
        self.count += 1
        for (reads, writes, numel), addresses in zip(
            self.sync if self.count % self.k == 0 else self.plain, self.addresses, strict=True
        ):
            _C.stream_floor(addresses[:reads], writes, numel, CHUNK)
