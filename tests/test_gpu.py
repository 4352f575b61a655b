"""Tests that need a CUDA GPU (`pytest -m gpu`, run by bench/gpu_report.sh); without one they
skip with the reason "needs a CUDA GPU".

- a whole training step (forward, backward, loss scaling with a device-side found_inf as
  GradScaler's contract asks, opt.step) captured in a CUDA graph and replayed, on every GPU
  backend, equals the same steps run eagerly, bit for bit;
- a real capture refuses a gradient that moved since the warm-up, with the clear error;
- the same capture with LOOKAHEAD_FUSED_SYNC_CHECK=1 (no synchronise inside the capture);
- a CPU tensor lr read on the host (no copy that waits for the GPU), refused under capture;
- every GPU backend against the reference on cuda, fp32 and bf16, with and without GradScaler
  (a sample of the variants; `python -m lookahead_fused check --device cuda` runs them all);
- the cuda backend's tables over many steps with `zero_grad(set_to_none=True)` (new gradient
  addresses, pinned staging reused or renewed) against the eager backend;
- with two GPUs: parameters on cuda:1 while cuda:0 is current, and adaptive α over a group
  spread over both, each equal to the same run on one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends
from lookahead_fused.check import quick_variants
from lookahead_fused.testing import run_against_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_BACKENDS = ("cuda", "triton", "foreach")
OPTIMIZERS = {
    "sgd": (LookaheadSGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (LookaheadAdam, {"lr": 1e-2, "amsgrad": True}),
    "adamw": (LookaheadAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam-adaptive": (LookaheadAdam, {"lr": 1e-2, "adaptive_alpha": True}),
}


def _usable(backend: str, device: str = "cuda:0") -> None:
    why = backends.unavailable(backend, torch.device(device))
    if why is not None:
        pytest.skip(f"backend {backend} cannot run on {device}: {why}")


def _batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 4, generator=gen)
    if step == 4:
        x[0, 0] = float("inf")  # an overflow: found_inf set on the device, the step skipped
    return x.to(device), y.to(device)


def _train(backend: str, name: str, graphed: bool, steps: int = 12) -> list[torch.Tensor]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4)).to(device)
    cls, options = OPTIMIZERS[name]
    lr = torch.tensor(options["lr"], device=device)
    opt = cls(model.parameters(), **{**options, "lr": lr}, k=3, capturable=True, backend=backend)
    scale, found_inf = torch.full((1,), 1024.0, device=device), torch.zeros(1, device=device)
    opt.grad_scale, opt.found_inf = scale, found_inf  # GradScaler's contract, on static tensors
    static_x, static_y = _batch(0, device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(static_x), static_y)
        (loss * scale).backward()
        grads = [p.grad for p in model.parameters()]
        found_inf.copy_((~torch.stack([g.isfinite().all() for g in grads]).all()).float().reshape(1))
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: tables, .grad tensors, autograd state
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            train_step()
        run = graph.replay
    else:
        run = train_step
    for step in range(steps):
        x, y = _batch(step, device)
        static_x.copy_(x)
        static_y.copy_(y)
        scale.fill_(2.0 ** (10 - step % 3))  # the scale moves between replays, outside the graph
        lr.fill_(options["lr"] / (1 + step))
        run()
    torch.cuda.synchronize()
    out = [p.detach().clone() for p in model.parameters()]
    out += [t.clone() for p in model.parameters() for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_graph_replay_of_a_training_step_equals_eager(backend: str, name: str) -> None:
    _usable(backend)
    eager, graphed = _train(backend, name, graphed=False), _train(backend, name, graphed=True)
    for i, (a, b) in enumerate(zip(eager, graphed, strict=True)):
        assert torch.equal(a, b), f"tensor {i}: max difference {(a.float() - b.float()).abs().max().item()}"


def test_graph_capture_with_sync_check() -> None:
    """LOOKAHEAD_FUSED_SYNC_CHECK=1 synchronises the stream after every launch, but not while
    it is captured (that would invalidate the capture): graph replay still equals eager. In a
    new process, since the variable is read at the first launch."""
    _usable("cuda")
    code = (
        "import torch\n"
        "from tests.test_gpu import _train\n"
        "eager, graphed = _train('cuda', 'adam', graphed=False), _train('cuda', 'adam', graphed=True)\n"
        "assert all(torch.equal(a, b) for a, b in zip(eager, graphed, strict=True))\n"
        "print('replay equals eager')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        env={**os.environ, "LOOKAHEAD_FUSED_SYNC_CHECK": "1"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "replay equals eager" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_a_cpu_lr_tensor_is_read_on_the_host_and_refused_under_capture(backend: str) -> None:
    _usable(backend)
    results = []
    for lr in (0.01, torch.tensor(0.01)):
        torch.manual_seed(0)
        p = torch.randn(1000, device="cuda", requires_grad=True)
        opt = LookaheadAdam([p], lr=lr, capturable=True, k=2, backend=backend)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="lr is a CPU tensor"), torch.cuda.graph(graph, stream=side):
        opt.step()


def test_real_capture_refuses_a_moved_gradient() -> None:
    _usable("cuda")
    p = torch.randn(1000, device="cuda", requires_grad=True)
    opt = LookaheadAdam([p], lr=torch.tensor(0.01, device="cuda"), capturable=True, backend="cuda")
    p.grad = torch.randn_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    p.grad = torch.randn_like(p)  # a new gradient tensor after the warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="gradient of parameter 0 .*moved"), torch.cuda.graph(graph):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backends_match_the_reference_on_cuda(backend: str, dtype: torch.dtype) -> None:
    _usable(backend)
    failures = []
    for variant in quick_variants():
        for scaler in (False, True):
            report = run_against_reference(backend, variant, dtype, "cuda", grad_scaler=scaler)
            failures += [f"{variant.name} scaler={scaler}: {f}" for f in report.failures]
    assert not failures, "\n".join(failures[:20])


def _model_run(backend: str, device: str, steps: int = 15, set_to_none: bool = True) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    opt = LookaheadAdam(model.parameters(), lr=1e-2, k=4, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        model(torch.randn(8, 16, generator=gen).to(device)).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


def test_tables_follow_new_gradients_every_step() -> None:
    _usable("cuda")
    got, want = _model_run("cuda", "cuda"), _model_run("eager", "cuda")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


two_gpus = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@two_gpus
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_parameters_on_the_second_gpu(backend: str) -> None:
    _usable(backend, "cuda:1")
    with torch.cuda.device(0):
        on_second = _model_run(backend, "cuda:1")
    assert all(t.device == torch.device("cuda", 1) for t in on_second)
    on_first = _model_run(backend, "cuda:0")
    for a, b in zip(on_second, on_first, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


@two_gpus
def test_adaptive_alpha_over_two_gpus_equals_one_gpu() -> None:
    _usable("cuda", "cuda:1")

    def run(devices: tuple[str, str]) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen).to(d).requires_grad_() for n, d in zip((70000, 333), devices)]
        opt = LookaheadAdam(params, lr=1e-2, k=2, adaptive_alpha=True, alpha_low=0.1, backend="cuda")
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.device)
            opt.step()
        torch.cuda.synchronize()
        return [p.detach().cpu() for p in params] + [opt.state[p]["slow_weights"].cpu() for p in params]

    for a, b in zip(run(("cuda:0", "cuda:1")), run(("cuda:0", "cuda:0")), strict=True):
        assert torch.equal(a, b)
