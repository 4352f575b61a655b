"""Capture a whole training step (forward, backward, Lookahead step) in one CUDA graph and
replay it.

    python examples/cuda_graph_step.py                  # on a machine with a CUDA GPU
    python examples/cuda_graph_step.py --dry-run-cpu    # the same loop on CPU, without capture

What a captured step needs from the optimizer, and how this script provides it:
- `capturable=True` and a tensor lr on the parameters' device: the step reads lr, the step
  counters and the "is this a sync step" decision on the device, never on the host. The lr
  is changed between replays by writing into that tensor (`lr.fill_(...)`), which the graph
  reads at every replay; assigning a new Python float to `param_group["lr"]` would not be seen;
- warm-up steps before the capture, on a side stream: the first step builds the optimizer's
  address tables (a host-to-device copy, which capture forbids) and the first backward
  allocates the `.grad` tensors;
- static buffers: the inputs are copied into the tensors the graph was captured with, and the
  gradients are zeroed in place (`zero_grad(set_to_none=False)`) inside the graph, so the
  backward writes into the same `.grad` tensors at every replay.

GradScaler: `torch.amp.GradScaler.step()` / `update()` keep per-iteration bookkeeping on the
host and are not captured. Prefer bf16 autocast (no loss scaling needed). For fp16, keep two
one-element fp32 device tensors as `opt.grad_scale` and `opt.found_inf` for the whole run
(the optimizer divides the gradients by grad_scale and skips the step, counters included,
when found_inf is non-zero, all on the device), multiply the loss by the scale inside the
graph, and write found_inf inside the graph from the gradients (for example
`found_inf.copy_(~torch.stack([g.isfinite().all() for g in grads]).all())`); adjust the scale
between replays outside the graph.

On a machine without CUDA the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lookahead_fused import LookaheadAdamW

WARMUP_STEPS = 3  # on a side stream, before the capture


def make_batch(step: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A regression batch: y = x @ W for a fixed W, plus noise (the same W at every step)."""
    gen = torch.Generator().manual_seed(step)
    w = torch.linspace(-1.0, 1.0, 32 * 4, dtype=torch.float32).reshape(32, 4)
    x = torch.randn(64, 32, generator=gen)
    y = x @ w + 0.01 * torch.randn(64, 4, generator=gen)
    return x.to(device), y.to(device)


def schedule(step: int, steps: int, peak: float = 3e-2) -> float:
    """Linear warm-up over the first tenth of the run, then linear decay to a tenth of peak."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (1.0 - 0.9 * (step - warm) / max(1, steps - warm))


def main(argv: Sequence[str] | None = None, guard: Callable[[], Any] = contextlib.nullcontext) -> list[float]:
    """Train for --steps replays; returns the losses. `guard` wraps every replay (the tests
    pass `tests.nosync.no_host_sync` to prove the dry run never syncs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default="auto", help="lookahead_fused backend (default: auto)")
    parser.add_argument(
        "--dry-run-cpu", action="store_true", help="run the same loop on CPU, without capture (capturable=True)"
    )
    args = parser.parse_args(argv)

    if args.dry_run_cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("cuda_graph_step.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it with --dry-run-cpu to execute the same loop on CPU without capture.")  # fmt: skip
        return []

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4)).to(device)
    # The lr lives in a device tensor that the captured step reads at every replay.
    lr = torch.tensor(schedule(0, args.steps), device=device)
    opt = LookaheadAdamW(model.parameters(), lr=lr, k=5, alpha=0.5, capturable=True, backend=args.backend)

    # Static inputs: the graph reads these tensors; each replay copies its batch into them.
    static_x, static_y = make_batch(0, device)

    def train_step() -> Tensor:
        opt.zero_grad(set_to_none=False)  # in place: the same .grad tensors at every replay
        loss = nn.functional.mse_loss(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss.detach()

    if device.type == "cuda":
        # Warm-up on a side stream (as torch.cuda.graph's documentation asks): builds the
        # optimizer's tables, allocates the gradients and initialises autograd's state.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                train_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = train_step()
        replay = graph.replay
    else:
        # Dry run: the same warm-up, then the step is called where the graph would be replayed.
        for _ in range(WARMUP_STEPS):
            train_step()
        static_loss = torch.zeros((), device=device)

        def replay() -> None:
            static_loss.copy_(train_step())

    # The warm-up (and, on a GPU, the capture) stepped the model: start the run from here.
    losses_on_device = []
    for step in range(args.steps):
        x, y = make_batch(step, device)
        static_x.copy_(x)
        static_y.copy_(y)
        lr.fill_(schedule(step, args.steps))  # read by the next replay, no recapture
        with guard():
            replay()
            losses_on_device.append(static_loss.clone())  # a device copy: no host sync per step

    losses = torch.stack(losses_on_device).tolist()  # one read-back at the end
    mode = "CUDA graph replay" if device.type == "cuda" else "dry run on CPU (no capture)"
    print(f"{mode}, backend={opt.backend}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
