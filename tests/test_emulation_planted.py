"""Checks of the CUDA kernels (run as "cuda_emulated") that catch bugs the rest of the suite
was seen to miss when they were planted in csrc/cuda/lookahead_kernels.cu: each test here
failed with its bug planted and passes without it."""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import _C, LookaheadAdam, backends

if backends.unavailable("cuda_emulated", torch.device("cpu")) is not None:
    pytest.skip("cuda_emulated is not built", allow_module_level=True)


from tests.test_emulation import _buckets, seed  # noqa: E402, F401  (seed: a fixture)


def _adaptive_sync_step():
    """Two steps (k=2, so the second syncs) of adaptive-α Adam over a bucket of 3 chunks
    (3 blocks): each block's partial sums, α̂ and the results."""
    torch.manual_seed(0)
    params = [torch.randn(n).requires_grad_() for n in (300, 200, 150)]
    opt = LookaheadAdam(params, lr=0.01, k=2, adaptive_alpha=True, alpha_low=0.1, backend="cuda_emulated")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    (b,) = _buckets(opt)
    assert b.backend_cache["cuda_grid"] == 3
    cache = b.backend_cache
    return cache["cuda_alpha_partials"].clone(), cache["cuda_alpha_hat"].clone(), [p.detach().clone() for p in params]


@pytest.mark.usefixtures("seed")
def test_adaptive_alpha_partials_are_kept_by_block_index_in_any_block_order() -> None:
    """Block b's partial sums go to slot b whatever order the blocks ran in, so finalize sums
    them in one fixed order: the partials and α̂ (fp64, before its rounding to fp32 in the
    sync) are bit for bit those of blocks in order. (Comparing only the fp32 results, as
    test_emulation's shuffled-order test does, misses a slot chosen by arrival order.)"""
    partials, alpha_hat, results = _adaptive_sync_step()
    assert partials.abs().sum() > 0 and alpha_hat.item() not in (0.0, 0.5)  # the reduction ran
    for s in (1, 2, 3, 5, 7):
        _C.emulated_set_block_order_seed(s)
        p, a, r = _adaptive_sync_step()
        assert torch.equal(p, partials), f"seed {s}: partials {p.tolist()} != {partials.tolist()}"
        assert torch.equal(a, alpha_hat), f"seed {s}"
        assert all(torch.equal(x, y) for x, y in zip(r, results)), f"seed {s}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_slow_weights_of_a_low_precision_model_keep_fp32_bits(dtype) -> None:
    """The slow weights of a bf16/fp16 model are fp32 by default: the sync's lerp must be
    rounded to fp32, not to the parameter's dtype. With α = 0.3 the lerp of two bf16/fp16
    values is almost never a bf16/fp16 value, so slow weights that all are (rounded to the
    parameter's dtype) give the bug away. The reference comparisons of the variant matrix
    cannot see it: one bf16 ulp of φ is within TOLERANCES[torch.bfloat16]."""
    torch.manual_seed(0)
    p = torch.randn(1000).to(dtype).requires_grad_()
    opt = LookaheadAdam([p], lr=0.01, k=2, alpha=0.3, backend="cuda_emulated")
    for _ in range(2):  # the second step syncs
        p.grad = torch.randn(1000).to(dtype)
        opt.step()
    phi = opt.state[p]["slow_weights"]
    assert phi.dtype == torch.float32
    moved = phi != phi.to(dtype).float()  # needs more precision than the parameter's dtype
    assert moved.float().mean() > 0.5, f"{(~moved).sum().item()} of {phi.numel()} slow weights are {dtype} values"
