"""The host emulation of the CUDA kernels is strict where a GPU is (DESIGN.md §5,
csrc/cuda_compat.h): vector accesses aligned to their size, the GPU's launch limits, blocks in
any order, no block touching what another block of the same launch wrote, no access outside the
tensors of the launch's device, and the error path of LOOKAHEAD_FUSED_SYNC_CHECK. Each check is
seen to fire, on small kernels that misbehave on purpose (`_C.emulated_selftest`) or on the
real kernels driven with bad tables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lookahead_fused import _C, LookaheadAdam, LookaheadAdamW, LookaheadSGD
from lookahead_fused.backends import cuda_emulated


@pytest.fixture
def strict():
    _C.emulated_set_strict(True)
    yield
    _C.emulated_set_strict(False)


@pytest.fixture
def seed():
    yield
    _C.emulated_set_block_order_seed(0)


def _buckets(opt):
    return [b for buckets in opt._group_buckets if buckets for b in buckets]


# ---------------------------------------------------------------------------------------
# Each check, on a kernel that misbehaves on purpose.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("misaligned", r"misaligned address: load of 16 bytes at 0x[0-9a-f]+, not aligned to 16 \(block 0, thread 0\)"),
        ("race_write", r"race between blocks: store at 0x[0-9a-f]+ by block \d, written by block \d"),
        ("race_read", r"race between blocks: (load|store) at 0x[0-9a-f]+ by block \d, (written|read) by block \d"),
        ("race_meta", r"race between blocks: .* at 0x[0-9a-f]+ by block \d"),
        ("illegal_address", r"illegal address: load of 16 bytes at 0x[0-9a-f]+ belongs to no tensor of device 1000"),
        ("out_of_bounds", r"illegal address: .* belongs to no tensor of device 1000"),
        (
            "shared_memory",
            r"too many resources requested for launch: 65536 bytes of static shared memory, more than 48",
        ),
        ("block_size", r"invalid configuration argument: grid 1, block 2048"),
        ("grid_size", r"invalid configuration argument: grid 2147483648"),
        ("kernel_params", r"too many resources requested for launch: 4100 bytes of kernel parameters, more than 4 KB"),
    ],
)
def test_check_fires(name, message) -> None:
    with pytest.raises(RuntimeError, match=rf"lookahead_fused: kernel selftest {name} failed: {message}"):
        _C.emulated_selftest(name)
    assert _C.emulated_selftest("aligned") == ""  # the control, and the fault did not stick


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_races_are_found_in_any_block_order(order, seed) -> None:
    _C.emulated_set_block_order_seed(order)
    for name in ("race_write", "race_read", "race_meta"):
        with pytest.raises(RuntimeError, match="race between blocks"):
            _C.emulated_selftest(name)
    assert not _C.emulated_strict()  # the self-test restores the setting


def test_unknown_selftest() -> None:
    with pytest.raises(ValueError, match="no self-test"):
        _C.emulated_selftest("nope")


# ---------------------------------------------------------------------------------------
# The real kernels: shuffled blocks give bitwise the same result; bad tables are caught.
# ---------------------------------------------------------------------------------------

FAMILIES = [
    ("sgd", LookaheadSGD, {"lr": 0.1}),
    ("sgd_momentum", LookaheadSGD, {"lr": 0.1, "momentum": 0.9, "inner_state": "pullback"}),
    ("adam", LookaheadAdam, {"lr": 0.01}),
    ("adamw_amsgrad", LookaheadAdamW, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "inner_state": "reset"}),
    ("adaptive_alpha", LookaheadAdam, {"lr": 0.01, "adaptive_alpha": True, "alpha_low": 0.1}),
]


def _run(cls, options, dtype=torch.float32, steps=4):
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=dtype).requires_grad_() for n in (1500, 33, 700, 2)]
    opt = cls(params, k=2, backend="cuda_emulated", **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in params] + [t.clone() for b in _buckets(opt) for t in b.flat.values()]


@pytest.mark.parametrize(("name", "cls", "options"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_shuffled_block_order_is_bitwise_equal(name, cls, options, seed, strict) -> None:
    """Blocks in shuffled orders (and the race detector on) change no bit of any result."""
    ordered = _run(cls, options)
    for s in (1, 7):
        _C.emulated_set_block_order_seed(s)
        shuffled = _run(cls, options)
        assert all(torch.equal(a, b) for a, b in zip(ordered, shuffled)), f"{name}, seed {s}"


def test_block_order_is_shuffled(seed) -> None:
    """The permutation is real: a kernel that records its block order sees it change (the
    race detector names the first writer, which is the first block run)."""
    firsts = set()
    _C.emulated_set_strict(True)
    try:
        for s in range(1, 12):
            _C.emulated_set_block_order_seed(s)
            with pytest.raises(RuntimeError) as e:
                _C.emulated_selftest("race_write")
            firsts.add(str(e.value).rsplit("written by block ", 1)[1][0])
    finally:
        _C.emulated_set_strict(False)
    assert len(firsts) > 1


def test_two_blocks_writing_one_chunk_is_a_race(strict) -> None:
    """A chunk table that hands the same chunk to two blocks (a bug in _tables) fails the
    launch under the race detector."""
    p = torch.randn(1024).requires_grad_()
    opt = LookaheadAdam([p], lr=0.01, backend="cuda_emulated")
    p.grad = torch.randn_like(p)
    opt.step()
    (b,) = _buckets(opt)
    chunks = b.backend_cache["cuda_chunks"]
    chunks[1] = chunks[0]  # blocks 0 and 1 both take chunk 0
    with pytest.raises(RuntimeError, match="race between blocks: .* by block [01], (written|read) by block [01]"):
        opt.step()


def test_numel_past_the_end_is_an_illegal_address() -> None:
    p = torch.randn(1000).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, backend="cuda_emulated")
    p.grad = torch.randn_like(p)
    opt.step()
    (b,) = _buckets(opt)
    b.backend_cache["cuda_segments"][0, 2] += 4  # numel: 4 elements more than the parameter has
    with pytest.raises(RuntimeError, match="illegal address: .* belongs to no tensor of device 0"):
        opt.step()


def test_a_tensor_of_another_device_is_an_illegal_address(monkeypatch) -> None:
    """A parameter that is not among the launch device's tensors (as if it lived on another
    GPU) is caught at its first access."""
    params = [torch.randn(100).requires_grad_(), torch.randn(100).requires_grad_()]
    opt = LookaheadSGD(params, lr=0.1, backend="cuda_emulated")
    for p in params:
        p.grad = torch.randn_like(p)
    foreign = params[1].data_ptr()
    real = cuda_emulated._tensors
    monkeypatch.setattr(cuda_emulated, "_tensors", lambda *a: [t for t in real(*a) if t.data_ptr() != foreign])
    with pytest.raises(RuntimeError, match=f"illegal address: .* at {foreign:#x} belongs to no tensor of device 0"):
        opt.step()


def test_launch_on_another_emulated_device_sees_only_its_tensors() -> None:
    p = torch.randn(64).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, backend="cuda_emulated")
    p.grad = torch.randn_like(p)
    opt.step()
    (b,) = _buckets(opt)
    a = _C.LaunchArgs()
    a.segments, a.num_segments = b.backend_cache["cuda_segments"].data_ptr(), 1
    a.chunks, a.num_chunks, a.chunk_size = b.backend_cache["cuda_chunks"].data_ptr(), 1, 256
    a.block, a.grid, a.k = 32, 1, 5
    a.slow, a.step, a.lookahead_step = (b.flat[k].data_ptr() for k in ("slow_weights", "step", "lookahead_step"))
    a.lr, a.device = 0.1, 3
    _C.emulated_set_device_ranges(3, [(torch.empty(16).data_ptr(), 64)])  # device 3 has another tensor
    try:
        with pytest.raises(RuntimeError, match="illegal address: .* belongs to no tensor of device 3"):
            _C.emulated_step(a)
    finally:
        _C.emulated_clear_device_ranges(3)
    _C.emulated_step(a)  # unchecked once the device has no ranges


# ---------------------------------------------------------------------------------------
# LOOKAHEAD_FUSED_SYNC_CHECK and errors that predate a launch.
# ---------------------------------------------------------------------------------------


def test_an_earlier_error_is_not_blamed_on_our_kernel() -> None:
    _C.emulated_set_pending_error("cudaErrorIllegalAddress: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match=r"an earlier CUDA error, pending before kernel selftest aligned was "
                                           r"launched \(not raised by it\): cudaErrorIllegalAddress"):  # fmt: skip
        _C.emulated_selftest("aligned")
    assert _C.emulated_selftest("aligned") == ""  # cleared, as cudaGetLastError clears it


@pytest.mark.parametrize("value", ["1", "0", None])
def test_sync_check_env_var(value) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOOKAHEAD_FUSED_SYNC_CHECK"}
    if value is not None:
        env["LOOKAHEAD_FUSED_SYNC_CHECK"] = value
    code = (
        "from lookahead_fused import _C\n"
        "try:\n    _C.emulated_selftest('misaligned')\nexcept RuntimeError as e:\n    print(e)\n"
        "print('sync', _C.emulated_sync_check())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    on = value == "1"
    assert f"sync {on}" in out
    assert ("seen by the stream synchronisation after it, LOOKAHEAD_FUSED_SYNC_CHECK" in out) == on
    assert "misaligned address" in out
