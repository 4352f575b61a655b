"""The cuda backend's work distribution (backends/cuda.py: plan_chunks), checked on the chunk
table itself, no GPU needed: for the benchmark's parameter sets on 108 and 132 SMs (A100, H100
/H200) with the backend's grid of 4 blocks per SM, the busiest block's work (elements, plus
CHUNK_OVERHEAD per chunk) is within 1.15x the mean; and the table keeps the kernel's chunk
semantics (a chunk never spans two parameters, starts at a multiple of the vector width,
every element in exactly one chunk). The kernel walks rows b, b + grid, ... for block b, which
block_work models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.params import param_set
from lookahead_fused import LookaheadAdam, backends
from lookahead_fused.backends.cuda import CHUNK_OVERHEAD, CUDA, ChunkPlan, plan_chunks
from lookahead_fused.testing import TOLERANCES

SETS = ("resnet50", "resnet152", "gpt2", "tiny10k")
SMS = (108, 132)
BOUND = 1.15


def _sizes(name: str) -> list[int]:
    return [math.prod(s) for s in param_set(name).shapes]


def _plan(name: str, sms: int) -> ChunkPlan:
    return plan_chunks(_sizes(name), 4 * sms, CUDA.chunk_size, CUDA.min_chunk)


def _check_semantics(plan: ChunkPlan, sizes: list[int], max_grid: int, min_chunk: int, max_chunk: int) -> None:
    assert plan.chunk_size % 4 == 0 and plan.chunk_size % min_chunk == 0
    assert min_chunk <= plan.chunk_size <= max_chunk
    assert plan.grid == max(1, min(len(plan.rows), max_grid))
    seen: dict[int, list[int]] = {}
    for segment, start in plan.rows:
        assert 0 <= start < sizes[segment] and start % plan.chunk_size == 0 and start % 4 == 0
        seen.setdefault(segment, []).append(start)
    for i, n in enumerate(sizes):  # every element once: the chunks of a parameter tile it
        assert sorted(seen.get(i, [])) == list(range(0, n, plan.chunk_size))


def _old_plan(sizes: list[int], max_grid: int, chunk_size: int = 1 << 16) -> ChunkPlan:
    """Before issue 13: chunks of 65,536 in parameter order, dealt round-robin."""
    rows = tuple((i, s) for i, n in enumerate(sizes) for s in range(0, n, chunk_size))
    return ChunkPlan(tuple(sizes), rows, chunk_size, max(1, min(len(rows), max_grid)))


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("name", SETS)
def test_blocks_get_balanced_work(name: str, sms: int) -> None:
    plan = _plan(name, sms)
    _check_semantics(plan, _sizes(name), 4 * sms, CUDA.min_chunk, CUDA.chunk_size)
    assert plan.imbalance(CHUNK_OVERHEAD) <= BOUND, (plan.chunk_size, plan.grid, plan.imbalance())
    assert plan.imbalance(0) <= BOUND  # in elements alone too
    work = plan.block_work()
    assert sum(work) == sum(_sizes(name)) + CHUNK_OVERHEAD * len(plan.rows)


def test_the_old_distribution_fails_the_bound() -> None:
    """What the bound catches: the round-robin of fixed 65,536-element chunks in parameter order
    (1.72x on ResNet-152 with 132 SMs, 2.2x on ResNet-50 with 108)."""
    assert _old_plan(_sizes("resnet152"), 4 * 132).imbalance() > 1.7
    assert _old_plan(_sizes("resnet50"), 4 * 108).imbalance() > 2.2


def test_plan_is_a_pure_function() -> None:
    sizes = _sizes("resnet50")
    assert _plan("resnet50", 108) == plan_chunks(list(sizes), 432, CUDA.chunk_size, CUDA.min_chunk)


@pytest.mark.parametrize(
    "sizes", [[], [0], [1], [0, 5, 0], [3] * 7, [1 << 20], [10**6 + 3, 7, 1, 4096], [65536 * 3 + 1] * 3]
)
@pytest.mark.parametrize(("max_grid", "min_chunk", "max_chunk"), [(3, 256, 256), (528, 1024, 65536), (8, 4, 64)])
def test_small_and_odd_buckets(sizes, max_grid, min_chunk, max_chunk) -> None:
    plan = plan_chunks(sizes, max_grid, max_chunk, min_chunk)
    _check_semantics(plan, sizes, max_grid, min_chunk, max_chunk)


def test_bad_chunk_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        plan_chunks([10], 4, 64, 6)


def test_emulation_keeps_its_fixed_chunks() -> None:
    """cuda_emulated's target (chunk_size 256, no min_chunk): always 256-element chunks."""
    from lookahead_fused.backends.cuda_emulated import EMULATED

    plan = plan_chunks([5000, 3, 300], EMULATED.max_grid(torch.device("cpu")), EMULATED.chunk_size, EMULATED.min_chunk)
    assert plan.chunk_size == 256 and plan.grid == 3


@pytest.mark.skipif(backends.unavailable("cuda_emulated", torch.device("cpu")) is not None, reason="needs _C")
@pytest.mark.parametrize("target", ["default", "variable chunks"])
def test_backend_launches_the_plan(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """The backend's tables are plan_chunks' (table, grid, chunk size), and the kernels give the
    reference's result with it, also with a chunk size the planner chose (min_chunk set)."""
    from lookahead_fused.backends import cuda_emulated

    if target != "default":
        monkeypatch.setattr(cuda_emulated, "EMULATED", dataclasses.replace(cuda_emulated.EMULATED, chunk_size=1024,
                                                                            min_chunk=64))  # fmt: skip
    t = cuda_emulated.EMULATED
    torch.manual_seed(0)
    shapes = [(3000,), (17,), (40, 25), (1,), (2049,)]
    params = [torch.randn(s).requires_grad_() for s in shapes]
    want_params = [p.detach().clone().requires_grad_() for p in params]
    opt = LookaheadAdam(params, lr=0.01, k=2, backend="cuda_emulated")
    want = LookaheadAdam(want_params, lr=0.01, k=2, backend="eager")
    for _ in range(4):
        for p, q in zip(params, want_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        want.step()
    (b,) = [b for buckets in opt._group_buckets if buckets for b in buckets]
    plan = plan_chunks([p.numel() for p in params], t.max_grid(b.device), t.chunk_size, t.min_chunk)
    cache = b.backend_cache
    assert torch.equal(cache["cuda_chunks"], plan.table())
    assert (cache["cuda_grid"], cache["cuda_chunk_size"]) == (plan.grid, plan.chunk_size)
    if target != "default":
        assert plan.chunk_size < t.chunk_size and plan.chunk_size != 256  # the planner chose a size
    for p, q in zip(params, want_params):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
