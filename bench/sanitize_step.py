"""One plain and one sync step of every kernel family, on tiny tensors: the program that
bench/gpu_report.sh runs under `compute-sanitizer --tool memcheck` and `--tool racecheck`.

    python bench/sanitize_step.py                      # backend cuda on the GPU
    python bench/sanitize_step.py --device cpu --backend cuda_emulated   # the same on the host build

Families: SGD, SGD with momentum (nesterov, pullback), Adam (with GradScaler's tensors and a
tensor lr), AdamW with amsgrad (reset), Adam with adaptive α (the two-stage reduction), each
in fp32 and bf16, over parameters that take the vector path, the scalar tail, a misaligned
view (scalar path) and a gradient with other strides (the scratch copy). k=2: step 1 is
plain, step 2 syncs. Exits 1 if a result is not finite; memory errors and races are the
sanitizer's to report (with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor is its own
allocation and an access past its end is seen).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD  # noqa: E402

FAMILIES = {
    "sgd": (LookaheadSGD, {"lr": 0.05}),
    "sgd-momentum": (LookaheadSGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "inner_state": "pullback"}),
    "adam": (LookaheadAdam, {"lr": 1e-3}),
    "adamw-amsgrad": (LookaheadAdamW, {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.1, "inner_state": "reset"}),
    "adaptive-alpha": (LookaheadAdam, {"lr": 1e-3, "adaptive_alpha": True, "alpha_low": 0.1}),
}


def _params(dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:  # drawn on the host, stored on the device in dtype
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # The view is taken of device memory: a view made on the host would be copied by .to()
    # into a fresh, aligned allocation, and the scalar path would not run.
    misaligned = randn(1 + 10 * 13)[1:].view(10, 13)
    if misaligned.data_ptr() % 16 == 0:
        raise AssertionError("the view meant to be misaligned is 16-byte aligned")
    tensors = [
        randn(1024),  # vector path
        randn(37),  # vector body and scalar tail
        misaligned,  # a view one element off: the scalar path
        randn(6, 5),  # its gradient gets other strides (a scratch copy)
    ]
    return [t.requires_grad_() for t in tensors]


def run(family: str, dtype: torch.dtype, device: torch.device, backend: str) -> bool:
    cls, options = FAMILIES[family]
    params = _params(dtype, device)
    if family == "adam":  # a tensor lr, read on the device
        options = {**options, "lr": torch.tensor(options["lr"], device=device)}
    opt = cls(params, k=2, backend=backend, **options)
    if family in ("adam", "adaptive-alpha"):  # GradScaler's tensors, as it hands them over
        opt.grad_scale = torch.full((1,), 4.0, device=device)
        opt.found_inf = torch.zeros(1, device=device)
    for step in range(2):  # a plain step, then a sync step
        gen = torch.Generator().manual_seed(step + 1)
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
            p.grad = g.t().contiguous().t() if i == 3 else g  # parameter 3: column-major gradient
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ok = all(bool(torch.isfinite(p.detach().float()).all()) for p in params)
    print(f"{family:<15} {str(dtype).removeprefix('torch.'):<9} backend={opt.backend}: {'ok' if ok else 'NOT FINITE'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--family", action="append", choices=tuple(FAMILIES), help="default: every family")
    parser.add_argument("--dtype", action="append", choices=("fp32", "bf16"), help="default: fp32 and bf16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtype or ("fp32", "bf16")]
    start = time.perf_counter()
    ok = all([run(f, dtype, device, args.backend) for f in args.family or FAMILIES for dtype in dtypes])
    print(f"sanitize_step: {'all finite' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
