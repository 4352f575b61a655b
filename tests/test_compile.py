"""torch.compile of `step()`: one custom op per step (lookahead_fused._ops), no graph break,
no recompilation from step to step, and the same numbers as an eager step.

Each test counts Dynamo's compilations with a counting compiler backend. The compiler behind
the counter varies on purpose: "inductor" (the default of torch.compile: functionalization
and re-inplacing, so the op gets the real tensors and the optimizer's cached tables are
reused), "aot_eager" (functionalization without re-inplacing: the op is handed copies and
must work on those), and "eager" (Dynamo's graph run as is; the cheapest).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend

from lookahead_fused import LookaheadAdam, LookaheadSGD, _ops, backends, reference, testing

CPU = torch.device("cpu")

# Backend -> the compiler behind the counter (see the module docstring).
COMPILERS = {"cpu": "inductor", "cuda_emulated": "aot_eager", "triton": "eager", "eager": "eager", "foreach": "eager"}
USABLE = [name for name in COMPILERS if backends.unavailable(name, CPU) is None]
FUSED = [name for name in ("cpu", "cuda_emulated", "triton") if name in USABLE]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0) -> list[Tensor]:
    """testing.SHAPES in fp32 (0-dim, empty, channels-last included) and one bf16 matrix, so
    that the second group holds two buckets."""
    gen = torch.Generator().manual_seed(seed + 7)
    extra = torch.randn(6, 4, generator=gen).to(torch.bfloat16).requires_grad_()
    return [*testing.make_params(torch.float32, CPU, seed), extra]


def _groups(params: list[Tensor]) -> list[dict[str, Any]]:
    """Two groups with their own k and tensor lr; the second uses adaptive α (two kernel
    passes on a sync step) and spans an fp32 and a bf16 bucket."""
    return [
        {"params": params[:2], "lr": torch.tensor(0.01)},
        {"params": params[2:], "lr": torch.tensor(0.02), "k": 3, "adaptive_alpha": True, "alpha_low": 0.2},
    ]


def _twin(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]  # clone keeps channels-last


def _set_grads(gen: torch.Generator, *param_lists: list[Tensor]) -> list[Tensor]:
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()
    return grads


def _assert_close(what: str, got: list[Tensor], want: list[Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, **testing.TOLERANCES[w.dtype], msg=lambda m, i=i: f"{what} {i}: {m}")


@pytest.mark.parametrize("backend", USABLE)
def test_compiled_step_matches_eager_and_reference(backend: str) -> None:
    """fullgraph=True (no graph break), six steps covering syncs of both groups (k = 2 and 3),
    an in-place change of a tensor lr: one compilation, and after every step the parameters
    and every state entry equal those of the same optimizer stepped eagerly and of the
    reference."""
    params = _model()
    twin, ref_params = _twin(params), [p.detach().clone() for p in params]
    opt = LookaheadAdam(_groups(params), k=2, weight_decay=0.01, backend=backend)
    eager = LookaheadAdam(_groups(twin), k=2, weight_decay=0.01, backend=backend)
    hypers = [{key: v for key, v in g.items() if key != "params"} for g in eager.param_groups]
    ref_groups = [ref_params[:2], ref_params[2:]]
    ref_states = [testing.reference_states("adam", ps, h) for ps, h in zip(ref_groups, hypers)]
    counter = CompileCounterWithBackend(COMPILERS[backend])
    compiled = torch.compile(opt.step, fullgraph=True, backend=counter)

    gen = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        if step == 4:  # an LR scheduler's in-place update: a graph input, no recompilation
            for o in (opt, eager):
                for g in o.param_groups:
                    g["lr"].fill_(g["lr"].item() / 2)
        grads = _set_grads(gen, params, twin)
        compiled()
        eager.step()
        for ps, gs, states, hyper in zip(ref_groups, (grads[:2], grads[2:]), ref_states, hypers):
            reference.step_group("adam", ps, gs, states, hyper)
        report = testing.Report()
        testing.compare_step(report, step, opt, params, ref_params, [s for ss in ref_states for s in ss])
        assert report.ok, report.failures
        _assert_close(f"step {step} param", params, twin)
        for key in opt.state[params[0]]:
            _assert_close(
                f"step {step} {key}", [opt.state[p][key] for p in params], [eager.state[t][key] for t in twin]
            )
    assert counter.frame_count == 1
    assert opt.state[params[0]]["lookahead_step"].item() == 6
    if backend == "cpu":  # inductor re-inplaced the op: it got the real tensors, tables were reused
        assert all(b.backend_cache["builds"] == 1 for bs in opt._group_buckets for b in bs)


def test_what_recompiles() -> None:
    """A float lr or another hyperparameter changed between steps is a constant of the graph:
    one more compilation, and the new value is used. A gradient that becomes None, and
    GradScaler's tensors appearing, make one more graph each; both are reused afterwards."""
    backend = FUSED[0]
    params = testing.make_params(torch.float32, CPU)
    twin = _twin(params)
    opt = LookaheadSGD(params, lr=0.1, momentum=0.9, k=2, backend=backend)
    eager = LookaheadSGD(twin, lr=0.1, momentum=0.9, k=2, backend=backend)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(opt.step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(2)

    def step(change: dict[str, Any] | None = None, no_grad: bool = False, scaler: float | None = None) -> None:
        _set_grads(gen, params, twin)
        for o, ps in ((opt, params), (eager, twin)):
            o.param_groups[0].update(change or {})
            if no_grad:
                ps[testing.NO_GRAD_INDEX].grad = None
            if scaler is not None:  # GradScaler's contract: the scale, and whether it found an inf
                o.grad_scale, o.found_inf = torch.tensor(1.0), torch.tensor(scaler)
        compiled()
        eager.step()
        for o in (opt, eager):
            if scaler is not None:
                del o.grad_scale, o.found_inf
        _assert_close("param", params, twin)
        for key in opt.state[params[0]]:
            _assert_close(key, [opt.state[p][key] for p in params], [eager.state[t][key] for t in twin])

    step()
    step()
    assert counter.frame_count == 1
    step({"lr": 0.05})
    assert counter.frame_count == 2
    step({"weight_decay": 0.1})
    step({"k": 3})
    assert counter.frame_count == 4
    step(no_grad=True)
    step()
    step(no_grad=True)
    assert counter.frame_count == 5
    before = [p.detach().clone() for p in params]
    step(scaler=1.0)  # found_inf set: nothing changes, the counters included
    _assert_close("param after found_inf", params, before)
    step(scaler=0.0)
    assert counter.frame_count == 6
    for o in (opt, eager):  # the buckets are rebuilt: the graph built on the old ones is not used
        o.load_state_dict(o.state_dict())
    step()
    step()
    assert counter.frame_count == 7


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend: str) -> None:
    """torch.library.opcheck: the declared mutations are the real ones, the fake impl agrees,
    and the op runs under AOT dispatch (which hands it copies)."""
    params = _model()
    opt = LookaheadAdam(_groups(params), k=1, backend=backend)  # k = 1: every step syncs
    spec = opt._init_group()
    gen = torch.Generator().manual_seed(3)
    grads = _set_grads(gen, params)
    grads[testing.NO_GRAD_INDEX] = None
    state = [t for bs in opt._group_buckets for b in bs for t in b.flat.values()]
    ordered = [p for bs in opt._group_buckets for b in bs for p in b.params]
    by_id = {id(p): g for p, g in zip(params, grads)}
    lrs = [g["lr"] for g in opt.param_groups]
    args = (spec, [p.detach() for p in ordered], [by_id[id(p)] for p in ordered], state, lrs, [0.0, 0.0], None, None)
    torch.library.opcheck(_ops.step, args)
