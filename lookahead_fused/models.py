"""torchvision's ResNet, built without torchvision: the model of examples/train_resnet.py and
the parameter shapes of the benchmark's ResNet sets (bench/params.py), from one definition.

A torchvision built for another torch fails to import beside a CPU torch, and the optimizer
itself needs no model library; the modules here are torchvision's in the same order, so
parameter names, shapes and `state_dict()` keys match (tests/test_train_resnet.py and
bench/test_bench.py check the counts of ResNet-50 and ResNet-152 against torchvision's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]

# name: (block, blocks per stage), as in torchvision.models and He et al. 2016, Table 1.
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """The projection shortcut (1x1 conv + bn) where the residual changes shape, else None."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(in_ch, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: the same modules in the same order, so parameter names, shapes
    and `state_dict()` keys match, and the same initialisation. `width` is the number of
    channels of the stem and the first stage (64 in the paper); each later stage doubles it.
    A smaller width gives the same architecture at a fraction of the cost, for quick runs."""

    # Added by add_module in __init__ (for mypy, which would see nn.Module.__getattr__'s type).
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, arch: str | tuple[str, Sequence[int]], num_classes: int = 1000, width: int = 64) -> None:
        """arch: a name of ARCHS, or (block kind, blocks per stage) for another depth."""
        super().__init__()
        if isinstance(arch, str) and arch not in ARCHS:
            raise ValueError(f"Unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
        kind, blocks = ARCHS[arch] if isinstance(arch, str) else arch
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        for stage, n in enumerate(blocks):
            stage_width = width << stage
            layer = []
            for i in range(n):
                layer.append(block(in_ch, stage_width, 2 if stage > 0 and i == 0 else 1))
                in_ch = stage_width * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_shapes(arch: str | Sequence[int], width: int = 64, num_classes: int = 1000) -> list[Shape]:
    """The parameter shapes of ResNet(arch) in `named_parameters()` order, read off a model
    built on the meta device (no memory, no initialisation cost). arch: a name of ARCHS, or
    the blocks per stage of a bottleneck ResNet."""
    spec = arch if isinstance(arch, str) else ("bottleneck", tuple(arch))
    with torch.device("meta"):
        model = ResNet(spec, num_classes, width)
    return [tuple(p.shape) for p in model.parameters()]
