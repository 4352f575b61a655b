"""Parameter sets by shape, so the benchmark needs no torchvision.

An optimizer step sees only the shapes of the parameters, so a model's parameter list is
rebuilt from its architecture: torchvision's ResNet-152 and ResNet-50 (the tensor count and
the parameter count of each are asserted against torchvision's), and a tiny ResNet for
`--quick` runs and the pytest-benchmark suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Shape = tuple[int, ...]


def resnet_shapes(blocks: Sequence[int], width: int = 64, num_classes: int = 1000) -> list[Shape]:
    """The parameter shapes of a bottleneck ResNet in torchvision's `named_parameters()` order:
    stem conv 7x7 + bn; per stage i, `blocks[i]` bottlenecks of width `width * 2**i`
    (1x1, 3x3, 1x1 convs, each followed by a bn, expansion 4), the first one with a
    downsample 1x1 conv + bn; then the classifier (weight and bias)."""
    shapes: list[Shape] = []

    def conv_bn(out_ch: int, in_ch: int, kernel: int) -> None:
        shapes.extend([(out_ch, in_ch, kernel, kernel), (out_ch,), (out_ch,)])  # conv weight, bn weight, bn bias

    conv_bn(width, 3, 7)
    in_ch = width
    for stage, n in enumerate(blocks):
        mid = width << stage
        out_ch = 4 * mid
        for block in range(n):
            conv_bn(mid, in_ch, 1)
            conv_bn(mid, mid, 3)
            conv_bn(out_ch, mid, 1)
            if block == 0:
                conv_bn(out_ch, in_ch, 1)
            in_ch = out_ch
    shapes.extend([(num_classes, in_ch), (num_classes,)])
    return shapes


@dataclass(frozen=True)
class ParamSet:
    name: str
    shapes: tuple[Shape, ...]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)

    def make(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = True
    ) -> list[Tensor]:
        """Fresh tensors of these shapes with standard normal values."""
        return [torch.randn(s, device=device, dtype=dtype).requires_grad_(requires_grad) for s in self.shapes]


# name -> (blocks per stage, width, classes, (tensors, parameters) that torchvision's model has)
_SETS = {
    "resnet152": ((3, 8, 36, 3), 64, 1000, (467, 60_192_808)),
    "resnet50": ((3, 4, 6, 3), 64, 1000, (161, 25_557_032)),
    "tiny": ((1, 1), 8, 10, None),
}
NAMES = tuple(_SETS)


def param_set(name: str) -> ParamSet:
    if name not in _SETS:
        raise ValueError(f"Invalid parameter set: {name!r} (choose from {', '.join(map(repr, NAMES))})")
    blocks, width, classes, expected = _SETS[name]
    params = ParamSet(name, tuple(resnet_shapes(blocks, width, classes)))
    if expected is not None:
        assert (params.tensors, params.numel) == expected, (
            f"{name}: {params.tensors} tensors, {params.numel} parameters"
        )
    return params
