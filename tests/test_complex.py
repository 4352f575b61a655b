"""Complex parameters, stepped as torch.optim steps them: as their real views.

torch.optim's SGD and Adam update a complex parameter through `torch.view_as_real`: every
operation works on the real and imaginary parts separately (Adam's second moment is the
square of each part). The fused classes do the same (lookahead_fused.reference, module
docstring): a complex64 parameter is a float32 (..., 2) tensor to the kernels, and its state
is complex, of the parameter's shape, in `optimizer.state[p]` and in checkpoints.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, testing

from .conftest import CPU

KINDS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "sgd": (LookaheadSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (LookaheadAdam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    "adamw": (LookaheadAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
}


def _complex_params(dtype: torch.dtype = torch.complex64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (7,), (2, 3, 2, 2), ()]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    params[2] = params[2].contiguous(memory_format=torch.channels_last)
    return [p.requires_grad_() for p in params]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _step_together(
    a: torch.optim.Optimizer, b: torch.optim.Optimizer, a_params: list[torch.Tensor], b_params: list[torch.Tensor]
) -> None:
    """Five steps of both optimizers on the same gradients; the parameters must agree after each."""
    for step in range(5):
        for p, q, g in zip(a_params, b_params, _grads(a_params, step)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(a_params, b_params):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", testing.variants(), ids=lambda v: v.name)
def test_complex_parameters_match_the_reference(backend: str, variant: testing.Variant) -> None:
    """Every variant, on every backend, against the reference on complex64 parameters
    (random real and imaginary parts; channels-last, a scalar and a gradient that is None on
    some sync steps among them), parameters and every state entry after each step."""
    report = testing.run_against_reference(backend, variant, torch.complex64)
    assert report.ok, report.failures[:5]


@pytest.mark.parametrize("kind", KINDS)
def test_with_alpha_one_complex_steps_are_torch_optims(backend: str, kind: str) -> None:
    """α = 1 makes the sync a no-op, so the fused class must step a complex model as
    torch.optim does; the comparison is with torch itself, not with this project's reference."""
    cls, torch_cls, hyper = KINDS[kind]
    ours, theirs = _complex_params(), _complex_params()
    opt = cls(ours, k=2, alpha=1.0, backend=backend, **hyper)
    ref = torch_cls(theirs, **hyper)
    _step_together(opt, ref, ours, theirs)
    for p, q in zip(ours, theirs):
        for key, want in ref.state[q].items():
            if key != "step":
                torch.testing.assert_close(opt.state[p][key], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_complex_parameter_steps_as_its_real_pairs(backend: str, kind: str) -> None:
    """The same run with the parameters given as real (..., 2) tensors (torch.view_as_real
    copies): the same numbers, bit for bit, with α < 1 (the sync lerp included)."""
    cls, _, hyper = KINDS[kind]
    complex_params = _complex_params()
    real_params = [torch.view_as_real(p.detach()).clone().requires_grad_() for p in complex_params]
    opts = [cls(ps, k=2, alpha=0.7, backend=backend, **hyper) for ps in (complex_params, real_params)]
    for step in range(5):
        for c, r, g in zip(complex_params, real_params, _grads(complex_params, step)):
            c.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
        for opt in opts:
            opt.step()
    for c, r in zip(complex_params, real_params):
        assert torch.equal(torch.view_as_real(c.detach()), r.detach())
        for key, value in opts[0].state[c].items():
            want = opts[1].state[r][key]
            if value.is_complex():
                assert value.shape == c.shape and value.dtype == c.dtype, key
                value = torch.view_as_real(value)
            assert torch.equal(value, want), key


def test_complex_and_real_parameters_share_a_group_and_resume_elsewhere(backend: str) -> None:
    """A group of complex64 and float32 parameters (one bucket: the same float32 parts), a
    checkpoint through torch.save with complex state, resumed on another backend."""
    torch.manual_seed(0)
    params = [torch.randn(5, 3, dtype=torch.complex64, requires_grad=True), torch.randn(6, requires_grad=True)]
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = LookaheadAdam(params, lr=0.01, k=3, alpha=0.6, backend=backend)
    ref = LookaheadAdam(twin, lr=0.01, k=3, alpha=0.6, backend="eager")
    for step in range(7):
        grads = _grads(params, step)
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if step == 3:  # resume the run on the other side of a checkpoint, on another backend
            import io

            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            saved = torch.load(buf)
            assert saved["state"][0]["exp_avg"].dtype == torch.complex64
            assert saved["state"][0]["slow_weights"].shape == (5, 3)
            other = "foreach" if backend != "foreach" else "cpu"
            opt = LookaheadAdam(params, lr=0.01, k=3, alpha=0.6, backend=other)
            opt.load_state_dict(saved)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        for key, want in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], want, atol=1e-6, rtol=1e-5)


def test_a_torch_optim_checkpoint_of_a_complex_model_loads(backend: str) -> None:
    """torch.optim.Adam's complex exp_avg/exp_avg_sq go into the flat state as real parts."""
    params = _complex_params()
    torch_opt = torch.optim.Adam(params, lr=0.01)
    for step in range(2):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        torch_opt.step()
    opt = LookaheadAdam(params, lr=0.01, backend=backend)
    opt.load_state_dict(torch_opt.state_dict())
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # the buckets are built here, the loaded state copied in
    for p in params:
        assert torch.equal(opt.state[p]["step"], torch_opt.state[p]["step"] + 1)
        assert opt.state[p]["exp_avg"].dtype == torch.complex64 and opt.state[p]["exp_avg"].shape == p.shape


def test_slow_weights_and_relayout_of_a_complex_parameter(backend: str) -> None:
    """`slow_weights()` swaps a complex parameter with its complex φ; after the parameter
    moves to channels_last its complex state views follow it, values kept."""
    torch.manual_seed(0)
    p = torch.randn(2, 3, 2, 2, dtype=torch.complex64, requires_grad=True)
    opt = LookaheadSGD([p], lr=0.1, momentum=0.9, k=3, alpha=0.5, backend=backend)
    for step in range(2):
        p.grad = _grads([p], step)[0]
        opt.step()
    slow = opt.state[p]["slow_weights"].clone()
    fast = p.detach().clone()
    assert not torch.equal(slow, fast)
    with opt.slow_weights():
        assert torch.equal(p.detach(), slow)
    assert torch.equal(p.detach(), fast)
    momentum = opt.state[p]["momentum_buffer"].clone()
    p.data = p.data.contiguous(memory_format=torch.channels_last)
    p.grad = _grads([p], 5)[0].contiguous(memory_format=torch.channels_last)
    before = p.detach().clone()
    opt.step()  # the third step: a sync
    state = opt.state[p]
    assert state["momentum_buffer"].stride() == p.stride()  # the complex view follows the parameter
    want_m = momentum * 0.9 + p.grad
    torch.testing.assert_close(state["momentum_buffer"], want_m, atol=1e-6, rtol=1e-5)
    want_theta = slow + 0.5 * ((before - 0.1 * want_m) - slow)
    torch.testing.assert_close(p.detach(), want_theta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("override", [dict(state_dtype=torch.bfloat16), dict(slow_dtype=torch.float16)], ids=str)
def test_complex_state_dtype_overrides_are_refused(override: dict[str, Any]) -> None:
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="keeps its state and slow weights in torch.float32"):
        LookaheadAdam([p], **override)
    opt = LookaheadAdam([torch.zeros(3, requires_grad=True)], **override)
    with pytest.raises(ValueError, match="keeps its state and slow weights in torch.float32"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_a_gradient_of_the_other_kind_is_refused(backend: str) -> None:
    """A real gradient set on a complex parameter through `.grad.data` (autograd refuses it
    otherwise): a clear error before anything changes."""
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    opt = LookaheadSGD([q, p], lr=0.1, backend=backend)
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.ones(3)
    q.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="gradient of dtype torch.float32 for a parameter of dtype torch.complex64"):
        opt.step()
    assert torch.equal(q.detach(), torch.zeros(3)) and not opt.state.get(q, {}).get("step", 0)


def test_compile_refuses_complex_parameters() -> None:
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = LookaheadSGD([p], lr=0.1, backend="cpu")
    with pytest.raises(Exception, match="does not support sharded \\(DTensor\\) or complex parameters"):
        torch.compile(opt.step, backend="eager")()
    assert torch.equal(p.detach(), torch.zeros(3, dtype=torch.complex64))


def test_complex128_steps_on_every_backend(backend: str) -> None:
    """complex128: float64 parts (the compiled backends route it to their fallback, as fp64)."""
    report = testing.run_against_reference(backend, testing.variants()[5], torch.complex128, steps=4)
    assert report.ok, report.failures[:5]
    assert CPU.type == "cpu"


def test_the_generic_wrapper_steps_complex_parameters_as_the_fused_class() -> None:
    """`Lookahead(torch.optim.Adam(...))`: torch steps the inner update, the wrapper the sync;
    the same numbers as the fused class on the same complex model."""
    from lookahead_fused import Lookahead

    fused_params, wrapped_params = _complex_params(), _complex_params()
    fused = LookaheadAdam(fused_params, lr=0.01, k=2, alpha=0.7, backend="eager")
    wrapped = Lookahead(torch.optim.Adam(wrapped_params, lr=0.01), k=2, alpha=0.7)
    _step_together(fused, wrapped, fused_params, wrapped_params)


FSDP2_ONE_RANK = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
from torch.distributed.fsdp import fully_shard
from lookahead_fused import LookaheadAdam

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
        self.b = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))

    def forward(self, x):
        return (x @ self.w + self.b).abs().sum()

torch.manual_seed(0)
sharded, plain = Model(), Model()
plain.load_state_dict(sharded.state_dict())
fully_shard(sharded)
opts = [LookaheadAdam(m.parameters(), lr=0.01, k=2, alpha=0.7, backend=b)
        for m, b in ((sharded, sys.argv[2]), (plain, "eager"))]
for step in range(5):
    x = torch.randn(2, 4, dtype=torch.complex64)
    for model, opt in zip((sharded, plain), opts):
        opt.zero_grad()
        model(x).backward()
        opt.step()
for p, q in zip(sharded.parameters(), plain.parameters()):
    torch.testing.assert_close(p.full_tensor(), q.detach(), atol=1e-6, rtol=1e-5)
    state = opts[0].state[p]
    assert type(state["exp_avg"]).__name__ == "DTensor" and state["exp_avg"].dtype == torch.complex64
    torch.testing.assert_close(state["slow_weights"].full_tensor(), opts[1].state[q]["slow_weights"])
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.parametrize("backend_name", ["cpu", "foreach"])
def test_fsdp2_shards_of_complex_parameters(backend_name: str) -> None:
    """FSDP2 (one gloo rank): a DTensor shard of a complex parameter is stepped as its real
    view, its state a complex DTensor; the same numbers as the eager reference unsharded.
    (tests/test_distributed.py runs two ranks for real parameters.)"""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", FSDP2_ONE_RANK, str(port), backend_name], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr[-3000:]
