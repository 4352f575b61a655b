"""pytest-benchmark suite on the tiny parameter set, and the parameter sets' structure.

    pytest bench/ --benchmark-only      # the timings (pytest-benchmark's statistics)
    pytest bench/                       # the same, plus the structural tests

The full comparison (every contender, ResNet-152, interleaved) is `python -m bench`.
"""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import backends

from .contenders import contenders
from .params import NAMES, param_set, resnet_shapes

CPU = torch.device("cpu")
TINY = param_set("tiny")

# The fused class on the backend "auto" picks here, against torch's fused Adam and SGD.
_FASTEST = backends.resolve("auto", {CPU})
_PICKED = [
    c
    for c in contenders(CPU)
    if c.name in (f"LookaheadAdam(backend={_FASTEST})", f"LookaheadSGD(backend={_FASTEST})") or c.baseline
]


@pytest.mark.parametrize("contender", _PICKED, ids=lambda c: c.name)
def test_step(benchmark, contender) -> None:
    params = TINY.make(CPU)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    before = [p.detach().clone() for p in params]
    opt = contender.build(params)
    benchmark(opt.step)
    # Every step moves every parameter (a constant gradient, no sync lands exactly back).
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.isfinite(p).all() for p in params)


def test_picked_contenders() -> None:
    assert len(_PICKED) == 4, [c.name for c in _PICKED]


@pytest.mark.parametrize("blocks", [(3, 4, 6, 3), (3, 8, 36, 3), (1, 1)])
def test_resnet_shapes_follow_the_architecture(blocks: tuple[int, ...]) -> None:
    shapes = resnet_shapes(blocks, width=16, num_classes=7)
    convs = [s for s in shapes if len(s) == 4]
    # stem + three convs per bottleneck + one downsample conv per stage; each conv has a bn (2 tensors)
    assert len(convs) == 1 + 3 * sum(blocks) + len(blocks)
    assert len(shapes) == 3 * len(convs) + 2
    assert shapes[0] == (16, 3, 7, 7)
    final_channels = 4 * 16 * 2 ** (len(blocks) - 1)
    assert shapes[-2:] == [(7, final_channels), (7,)]
    assert sum(s[2] == 3 for s in convs) == sum(blocks)  # one 3x3 conv per bottleneck
    # each conv reads what the one before it in its path wrote (the downsample reads the block's input)
    assert all(a[0] == b[1] for a, b in zip(convs, convs[1:], strict=False) if b[2] == 3)


def test_param_sets() -> None:
    for name in NAMES:
        pset = param_set(name)  # the real ResNets assert torchvision's counts when built
        assert pset.numel == sum(torch.Size(s).numel() for s in pset.shapes)
    params = TINY.make(CPU, torch.bfloat16)
    assert [tuple(p.shape) for p in params] == list(TINY.shapes)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in params)
    with pytest.raises(ValueError, match="Invalid parameter set"):
        param_set("resnet9000")
