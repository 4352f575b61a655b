"""The CPU bandwidth floor, and the "cpu" backend measured against it and torch's fused optimizers.

`floor_seconds(n, reads, writes)` times `_C.stream_floor`: a streaming kernel over n fp32
elements that reads `reads` buffers and writes `writes` of them back in place, with the
same OpenMP chunking as the optimizer kernels. Its destinations are read anyway, as an
optimizer's are, so it counts no read-for-ownership that the optimizer would not pay: a plain
copy or triad would understate the floor.

    python bench/cpu_floor.py [--reps 7] [--k 5]

prints, for the ResNet-152 parameter set (467 fp32 tensors, 60,192,808 elements), the time
per step of LookaheadAdam(backend="cpu") amortised over a k-cycle beside
torch.optim.Adam(fused=True) and the floor with the same bytes, and the same for
LookaheadSGD(momentum=0.9) beside torch.optim.SGD(fused=True). Candidates run interleaved,
one step (or one k-cycle) each per round, and the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from lookahead_fused import _C, LookaheadAdam, LookaheadSGD
from lookahead_fused.backends.cpu import CHUNK


def resnet152_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet152 in registration order (467 tensors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for blocks, width in zip((3, 8, 36, 3), (64, 128, 256, 512), strict=True):
        out_ch = width * 4
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:  # downsample: conv1x1 + bn
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def floor_seconds(n: int, reads: int, writes: int, reps: int = 5) -> float:
    """Median time of one streaming pass over n fp32 elements with the given access pattern."""
    buffers = [torch.rand(n) for _ in range(reads)]
    addresses = [b.data_ptr() for b in buffers]
    run = lambda: _C.stream_floor(addresses, writes, n, CHUNK)  # noqa: E731
    run()  # first touch
    return statistics.median(_time(run) for _ in range(reps))


def _params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).requires_grad_()
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def _floor_cycle(addresses: list[int], n: int, k: int, plain: tuple[int, int], sync: tuple[int, int]) -> None:
    """k streaming passes with an optimizer cycle's pattern: k - 1 plain steps, one sync."""
    for _ in range(k - 1):
        _C.stream_floor(addresses[: plain[0]], plain[1], n, CHUNK)
    _C.stream_floor(addresses[: sync[0]], sync[1], n, CHUNK)


def _steps(opt: torch.optim.Optimizer, k: int) -> None:
    for _ in range(k):
        opt.step()


def compare(reps: int = 7, k: int = 5) -> list[tuple[str, float, float, float, float]]:
    """Rows (name, lookahead s/step, fused torch s/step, floor s/step, bytes/elem amortised)."""
    shapes = resnet152_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    cases = [
        ("Adam", lambda ps: LookaheadAdam(ps, lr=1e-3, k=k, backend="cpu"),
         lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), (4, 3), (5, 4)),
        ("SGD momentum=0.9", lambda ps: LookaheadSGD(ps, lr=1e-3, momentum=0.9, k=k, backend="cpu"),
         lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True), (3, 2), (4, 3)),
    ]  # fmt: skip
    for name, make_ours, make_torch, plain, sync in cases:
        ours, theirs = make_ours(_params(shapes)), make_torch(_params(shapes))
        for _ in range(k):  # state allocated, pages touched, first sync done
            ours.step()
        theirs.step()
        floor_bufs = [torch.rand(n) for _ in range(sync[0])]
        floor_cycle = functools.partial(_floor_cycle, [b.data_ptr() for b in floor_bufs], n, k, plain, sync)
        ours_cycle = functools.partial(_steps, ours, k)
        t_ours, t_torch, t_floor = [], [], []
        for _ in range(reps):
            t_ours.append(_time(ours_cycle) / k)
            t_torch.append(_time(theirs.step))
            t_floor.append(_time(floor_cycle) / k)
        bytes_per = 4 * ((k - 1) * (plain[0] + plain[1]) + sync[0] + sync[1]) / k
        medians = statistics.median(t_ours), statistics.median(t_torch), statistics.median(t_floor)
        rows.append((name, *medians, bytes_per))
        del ours, theirs, floor_bufs
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    info = _C.build_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, _C: {info['compiler']} {info['simd']}")
    header = ("inner", "lookahead cpu", "torch fused", "floor", "B/elem", "vs fused", "floor/ours")
    print("{:<18} {:>14} {:>12} {:>9} {:>7} {:>9} {:>11}".format(*header))
    for name, ours, theirs, floor, per in compare(args.reps, args.k):
        print(f"{name:<18} {ours * 1e3:>11.2f} ms {theirs * 1e3:>9.2f} ms {floor * 1e3:>6.2f} ms {per:>7.1f} "
              f"{ours / theirs:>8.2f}x {floor / ours:>10.0%}")  # fmt: skip
