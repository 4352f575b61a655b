"""Backend "cuda_emulated": the CUDA kernels of csrc/cuda/ compiled by the host compiler and
run on CPU tensors (DESIGN.md §5). It exists so that every line of the CUDA backend's kernels
and launch logic is executed against the reference on machines without a GPU; it is slow
(threads of a block run one after another) and meant for tests, not training.

Everything but the target is backends/cuda.py: the same tables, launches and device-side
decisions. The grid is small (at most 3 blocks of 32 threads) and chunks are short, so that
small test models still exercise several blocks, the grid-stride loop over chunks and the
two-stage reduction of adaptive α.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._buckets import Bucket
from .cuda import _Target, run_step

EMULATED = _Target(
    name="cuda_emulated",
    device_type="cpu",
    prefix="emulated_",
    chunk_size=256,
    block=32,
    max_grid=lambda device: 3,
    stream=lambda device: 0,
)


def unavailable(device: torch.device) -> str | None:
    return EMULATED.unavailable(device)


def step(
    kind: str,
    group: dict[str, Any],
    buckets: list[Bucket],
    grads: list[list[Tensor | None]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    run_step(EMULATED, kind, group, buckets, grads, grad_scale, found_inf)
