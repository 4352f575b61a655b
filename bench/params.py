"""Parameter sets by shape, so the benchmark needs no torchvision.

An optimizer step sees only the shapes of the parameters, so a model's parameter list is
rebuilt from its architecture (the ResNets from lookahead_fused.models, the model of the
training example): torchvision's ResNet-152 and ResNet-50, GPT-2 small (a transformer: few
large matrices), 10,000 tensors of 64 elements (per-tensor overhead), each
with its tensor and parameter counts asserted against the original model's, and a tiny
ResNet for `--quick` runs and the pytest-benchmark suite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lookahead_fused.models import resnet_shapes

Shape = tuple[int, ...]


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


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list[Shape]:
    """The parameter shapes of GPT-2 in Hugging Face's `named_parameters()` order (the output
    layer is tied to the token embedding, so it is not a parameter of its own): token and
    position embeddings; per layer ln_1, attention (fused qkv projection and output
    projection, Conv1D weights stored (in, out)), ln_2, MLP (4x width); the final ln_f.
    A transformer's step is a few large matrices and many small vectors."""
    layer = [
        (width,), (width,),  # ln_1 weight, bias
        (width, 3 * width), (3 * width,),  # attn.c_attn
        (width, width), (width,),  # attn.c_proj
        (width,), (width,),  # ln_2
        (width, 4 * width), (4 * width,),  # mlp.c_fc
        (4 * width, width), (width,),  # mlp.c_proj
    ]  # fmt: skip
    return [(vocab, width), (context, width), *layer * layers, (width,), (width,)]


# name -> (shapes, (tensors, parameters) that the original model has, or None)
_SETS = {
    "resnet152": (lambda: resnet_shapes("resnet152"), (467, 60_192_808)),  # torchvision's
    "resnet50": (lambda: resnet_shapes("resnet50"), (161, 25_557_032)),  # torchvision's
    "gpt2": (gpt2_shapes, (148, 124_439_808)),  # Hugging Face's GPT-2 small ("gpt2")
    # Per-tensor overhead alone: many tiny tensors (biases, norms) with almost no bytes each.
    "tiny10k": (lambda: [(64,)] * 10_000, (10_000, 640_000)),
    "tiny": (lambda: resnet_shapes((1, 1), width=8, num_classes=10), None),  # --quick and pytest
}
NAMES = tuple(_SETS)


def param_set(name: str) -> ParamSet:
    if name not in _SETS:
        raise ValueError(f"Invalid parameter set: {name!r} (choose from {', '.join(map(repr, NAMES))})")
    shapes, expected = _SETS[name]
    params = ParamSet(name, tuple(shapes()))
    if expected is not None:
        assert (params.tensors, params.numel) == expected, (
            f"{name}: {params.tensors} tensors, {params.numel} parameters"
        )
    return params
