"""The CPU bandwidth floor: what one optimizer step cannot beat on this machine.

`FloorCycle` runs `_C.stream_floor`, a streaming kernel over n fp32 elements that reads
`reads` buffers and writes `writes` of them back in place, with the same OpenMP chunking as
the optimizer kernels and an optimizer step's pattern of accesses. Its destinations are read
anyway, as an optimizer's are, so it counts no read-for-ownership that the optimizer would
not pay: a plain copy or triad would understate the floor. `python -m bench` times it beside
the optimizers, interleaved, as the "floor" row of each family.
"""

from __future__ import annotations

import torch

from lookahead_fused import _C
from lookahead_fused.backends.cpu import CHUNK

# fp32 buffers read and written by one step, (reads, writes), plain and sync (DESIGN §4):
# Adam reads θ g m v and writes θ m v; SGD with momentum reads θ g b and writes θ b; a sync
# step also reads and writes φ.
PATTERNS = {"adam": ((4, 3), (5, 4)), "sgd": ((3, 2), (4, 3))}


class FloorCycle:
    """A stand-in optimizer whose step() is a streaming pass with the optimizer's accesses
    over n fp32 elements: plain steps, and with lookahead=True every k-th step a sync step.
    The benchmark times it beside the optimizers: the bandwidth floor, measured in the same run."""

    def __init__(self, n: int, family: str, k: int, lookahead: bool) -> None:
        self.plain, self.sync = PATTERNS[family]
        if not lookahead:
            self.sync = self.plain
        self.buffers = [torch.rand(n) for _ in range(self.sync[0])]
        self.addresses = [b.data_ptr() for b in self.buffers]
        self.n, self.k, self.count = n, k, 0

    def step(self) -> None:
        self.count += 1
        reads, writes = self.sync if self.count % self.k == 0 else self.plain
        _C.stream_floor(self.addresses[:reads], writes, self.n, CHUNK)
