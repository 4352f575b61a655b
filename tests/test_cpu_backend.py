"""The "cpu" backend beyond the generic matrix (tests/test_backends.py runs that): the
segment table's caching, gradient layouts, chunking across parameters with several
OpenMP threads, inputs rejected before any address reaches C++, and the build info."""

from __future__ import annotations

import platform

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends, reference
from lookahead_fused.testing import TOLERANCES

if backends.unavailable("cpu", torch.device("cpu")) is not None:
    pytest.fail(f"the cpu backend must be usable on CPU: {backends.unavailable('cpu', torch.device('cpu'))}")

from lookahead_fused import _C  # noqa: E402
from lookahead_fused.backends import cpu  # noqa: E402


def _builds(opt) -> int:
    return sum(b.backend_cache.get("builds", 0) for buckets in opt._group_buckets if buckets for b in buckets)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _backward(model: torch.nn.Module) -> None:
    x = torch.randn(4, 6, dtype=next(model.parameters()).dtype)
    model(x).square().sum().backward()


def _reference_run(kind, params, grads_per_step, **hyper):
    """The eager reference over copies of `params`: returns the final parameters."""
    group = {"inner_state": "maintain", "maximize": False, "weight_decay": 0.0, **hyper}
    ps = [p.detach().clone() for p in params]
    states = [reference.init_state(p, optimizer=kind, momentum=group.get("momentum", 0.0)) for p in ps]
    for grads in grads_per_step:
        reference.step_group(kind, ps, grads, states, group)
    return ps


# ---------------------------------------------------------------------------------------
# The segment table.
# ---------------------------------------------------------------------------------------


def test_table_reused_while_nothing_moves() -> None:
    model = _model()
    opt = LookaheadAdam(model.parameters(), lr=0.01, k=2, backend="cpu")
    for _ in range(4):
        _backward(model)
        opt.step()
        model.zero_grad(set_to_none=False)  # gradients zeroed in place: same addresses
    assert _builds(opt) == 1


def test_only_grad_columns_rewritten_for_new_grad_tensors() -> None:
    model = _model()
    opt = LookaheadSGD(model.parameters(), lr=0.1, momentum=0.9, backend="cpu")
    _backward(model)
    opt.step()
    cache = opt._group_buckets[0][0].backend_cache
    keep = [p.grad for p in model.parameters()]  # keep the old grads alive: new ones get new addresses
    model.zero_grad(set_to_none=True)
    _backward(model)
    assert all(p.grad.data_ptr() != g.data_ptr() for p, g in zip(model.parameters(), keep, strict=True))
    opt.step()
    assert (cache["builds"], cache["grad_updates"]) == (1, 2)
    assert cache["table"][:, 1].tolist() == [p.grad.data_ptr() for p in model.parameters()]


def test_grad_set_to_none_skips_update_but_syncs() -> None:
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = LookaheadSGD([p, q], lr=1.0, k=2, alpha=0.5, backend="cpu")
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()  # both move to -1
    q.grad = None
    opt.step()  # p moves to -2, q stays at -1; sync: φ = 0 + 0.5 (θ - 0)
    torch.testing.assert_close(p.detach(), torch.full((3,), -1.0))
    torch.testing.assert_close(q.detach(), torch.full((3,), -0.5))
    assert opt._group_buckets[0][0].backend_cache["table"][:, 5].tolist() == [1, 0]


def test_table_rebuilt_when_data_replaced() -> None:
    p = torch.zeros(10, requires_grad=True)
    opt = LookaheadSGD([p], lr=1.0, k=100, backend="cpu")
    p.grad = torch.ones(10)
    opt.step()
    old = p.data
    p.data = torch.zeros(10)  # the step must now write the new storage, not the old one
    opt.step()
    assert _builds(opt) == 2
    torch.testing.assert_close(p.detach(), torch.full((10,), -1.0))
    torch.testing.assert_close(old, torch.full((10,), -1.0))  # untouched by the second step


def test_half_model_rebuilds_and_matches_eager() -> None:
    """model.half() after a step: new fp16 tensors, so buckets and tables are rebuilt, and
    the cpu backend keeps agreeing with the eager one."""
    models, opts = [], []
    for backend in ("cpu", "eager"):
        model = _model()
        models.append(model)
        opts.append(LookaheadAdam(model.parameters(), lr=0.01, k=2, backend=backend))
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        if step == 1:
            for model in models:
                model.half()
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts, strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.to(p.dtype)
            opt.step()
    assert all(b.dtype == torch.float16 for b in opts[0]._group_buckets[0])
    table = opts[0]._group_buckets[0][0].backend_cache["table"]
    assert table[:, 0].tolist() == [p.data_ptr() for p in models[0].parameters()]
    for got, want in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), **TOLERANCES[torch.float16])


def test_grad_with_other_strides_is_relaid() -> None:
    """A gradient whose strides differ from its (channels-last) parameter's is copied into
    the parameter's layout; the result equals a run with a matching gradient."""
    torch.manual_seed(1)
    base = torch.randn(2, 3, 4, 5)
    grads = [torch.randn(2, 3, 4, 5) for _ in range(3)]  # contiguous: not the parameter's layout
    results = []
    for layout in ("mismatch", "match"):
        p = base.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        opt = LookaheadAdam([p], lr=0.01, k=2, backend="cpu")
        for g in grads:
            p.grad = g.clone() if layout == "mismatch" else g.contiguous(memory_format=torch.channels_last)
            assert (p.grad.stride() != p.stride()) == (layout == "mismatch")
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
    want = _reference_run("adam", [base], [[g] for g in grads], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                          amsgrad=False, k=2, alpha=0.5)  # fmt: skip
    torch.testing.assert_close(results[0], want[0], **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------
# Chunking: parameters that straddle chunk boundaries, several threads.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_odd_sizes_across_chunks(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(cpu, "CHUNK", 1000)  # many chunks, most spanning two parameters
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        torch.manual_seed(2)
        shapes = [(1,), (999,), (0,), (4099,), (37, 53), (7,), (3001,)]
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        start = [p.detach().clone() for p in params]
        steps = [[torch.randn(s) if i != 5 or n % 2 else None for i, s in enumerate(shapes)] for n in range(4)]
        hyper = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False) if kind == "sgd" else \
            dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, amsgrad=False)  # fmt: skip
        cls = LookaheadSGD if kind == "sgd" else LookaheadAdam
        opt = cls(params, k=3, alpha=0.5, backend="cpu", **hyper)
        for grads in steps:
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()
        want = _reference_run(kind, start, steps, k=3, alpha=0.5, **hyper)
        for i, (got, ref) in enumerate(zip(params, want, strict=True)):
            torch.testing.assert_close(got.detach(), ref, **TOLERANCES[torch.float32], msg=f"parameter {i}")
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# Inputs rejected in Python, before any address crosses into C++.
# ---------------------------------------------------------------------------------------


def test_resized_storage_rejected() -> None:
    p = torch.zeros(1000, requires_grad=True)
    opt = LookaheadSGD([p], lr=0.1, backend="cpu")
    p.grad = torch.ones(1000)
    opt.step()
    p.data.untyped_storage().resize_(16)  # the parameter now claims more than its storage holds
    with pytest.raises(RuntimeError, match="storage"):
        opt.step()


def test_parameter_resized_behind_the_optimizer_rejected() -> None:
    p = torch.zeros(10, requires_grad=True)
    opt = LookaheadSGD([p], lr=0.1, backend="cpu")
    p.grad = torch.ones(10)
    opt.step()
    p.data = torch.zeros(12)
    p.grad = torch.ones(12)
    with pytest.raises(RuntimeError, match="elements"):
        opt.step()


def test_grad_dtype_mismatch_rejected() -> None:
    p = torch.zeros(10, dtype=torch.bfloat16, requires_grad=True)
    opt = LookaheadAdam([p], backend="cpu")
    p.grad_dtype = None  # autograd itself would refuse the mismatch; a user can lift that
    p.grad = torch.ones(10, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()


def test_non_dense_parameter_stepped_by_eager() -> None:
    """The kernels need dense parameters: a group with a strided view goes to backend "eager"
    (tests/test_non_dense.py checks it against the reference on every backend)."""
    base = torch.zeros(4, 6)
    p = base[:, ::2].requires_grad_()  # a strided view: gaps between its elements
    opt = LookaheadSGD([p], lr=0.1, backend="cpu")
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4, 3), -0.1))
    assert torch.equal(base[:, 1::2], torch.zeros(4, 3))  # the gaps untouched
    (bucket,) = opt._group_buckets[0]
    assert bucket.stepped_by[0] == "eager" and "is not dense" in bucket.stepped_by[1]


def test_not_available_off_cpu() -> None:
    assert cpu.unavailable(torch.device("meta")) == "the cpu backend runs on CPU tensors"
    assert cpu.unavailable(torch.device("cpu")) is None


def test_found_inf_changes_nothing() -> None:
    p = torch.randn(50, requires_grad=True)
    opt = LookaheadAdam([p], lr=0.1, k=1, backend="cpu")
    p.grad = torch.randn(50)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    theta = p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), theta)
    for key, value in opt.state[p].items():
        assert torch.equal(value, before[key]), key


def test_fp64_group_falls_back_to_reference() -> None:
    p = torch.randn(20, dtype=torch.float64, requires_grad=True)
    start = p.detach().clone()
    grads = [torch.randn(20, dtype=torch.float64) for _ in range(3)]
    opt = LookaheadAdam([p], lr=0.01, k=2, backend="cpu")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = _reference_run("adam", [start], [[g] for g in grads], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                          amsgrad=False, k=2, alpha=0.5)  # fmt: skip
    torch.testing.assert_close(p.detach(), want[0], **TOLERANCES[torch.float64])


# ---------------------------------------------------------------------------------------
# The compiled module itself.
# ---------------------------------------------------------------------------------------


def test_build_info() -> None:
    info = _C.build_info()
    assert {"compiler", "flags", "simd", "openmp_max_threads", "cuda", "cuda_architectures"} <= set(info)
    assert "-O3" in info["flags"] and "-fno-math-errno" in info["flags"]
    assert info["openmp_max_threads"] >= 1
    assert info["cuda"] == bool(info["cuda_architectures"])


@pytest.mark.parametrize("reads,writes", [(4, 3), (5, 4), (3, 2)])
def test_stream_floor_touches_exactly_its_buffers(reads: int, writes: int) -> None:
    n = 3001
    bufs = [torch.full((n + 2,), float(j + 1)) for j in range(reads)]
    before = [b.clone() for b in bufs]
    _C.stream_floor([b[1:].data_ptr() for b in bufs], writes, n - 1, 1000)  # element 0 and the tail stay
    for j, (b, old) in enumerate(zip(bufs, before, strict=True)):
        assert torch.equal(b[0], old[0]) and torch.equal(b[n:], old[n:])
        changed = not torch.equal(b[1:n], old[1:n])
        assert changed == (j < writes), f"buffer {j}"


def test_resized_grad_storage_rejected() -> None:
    p = torch.zeros(1000, requires_grad=True)
    opt = LookaheadSGD([p], lr=0.1, backend="cpu")
    p.grad = torch.ones(1000)
    p.grad.untyped_storage().resize_(16)
    with pytest.raises(RuntimeError, match="storage"):
        opt.step()


# ---------------------------------------------------------------------------------------
# ISA levels: a portable build holds the kernels once per level and runs the highest one the
# CPU supports (CMakeLists.txt, LOOKAHEAD_FUSED_CPU_ARCH=dispatch); all levels agree bit for bit.
# ---------------------------------------------------------------------------------------


def test_isa_levels_reported() -> None:
    info = _C.build_info()
    built, supported = list(info["cpu_isas"]), list(info["cpu_isas_supported"])
    assert built and set(supported) <= set(built) and supported
    assert info["cpu_isa"] == _C.cpu_isa() in supported
    if info["cpu_arch"] == "dispatch" and platform.machine() in ("x86_64", "AMD64"):
        assert built[0] == "x86-64" and "x86-64-v3" in built  # the baseline, and AVX2 with every GCC >= 11
        assert info["cpu_isa"] == supported[-1], "the highest level this CPU supports is selected"
        want = {"x86-64": "SSE2", "x86-64-v3": "AVX2", "x86-64-v4": "AVX512"}[info["cpu_isa"]]
        assert info["simd"] == want
    elif info["cpu_arch"] != "dispatch":
        assert built == [info["cpu_arch"] or "default"]


@pytest.fixture
def restore_isa():
    selected = _C.cpu_isa()
    yield
    _C.cpu_set_isa(selected)


def test_set_isa_refuses_unknown_and_unsupported(restore_isa) -> None:
    info = _C.build_info()
    with pytest.raises(ValueError, match="not built"):
        _C.cpu_set_isa("x86-64-v9")
    for level in info["cpu_isas"]:
        if level in info["cpu_isas_supported"]:
            _C.cpu_set_isa(level)
            assert _C.cpu_isa() == level and _C.build_info()["cpu_isa"] == level
        else:
            with pytest.raises(ValueError, match="lacks"):
                _C.cpu_set_isa(level)


def _isa_run(kind: str, dtype: torch.dtype, hyper: dict) -> list[torch.Tensor]:
    """Four steps (two syncs) over odd-sized tensors: final parameters and every state tensor."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(1037,), (3, 7), (1,), (64, 33)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(4)]
    cls = {"sgd": LookaheadSGD, "adam": LookaheadAdam, "adamw": LookaheadAdamW}[kind]
    opt = cls(params, k=2, alpha=0.6, backend="cpu", **hyper)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "kind,hyper",
    [
        ("adam", dict(lr=0.01)),
        ("adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
        ("adam", dict(lr=0.01, adaptive_alpha=True, inner_state="reset")),
        ("adamw", dict(lr=0.01, weight_decay=0.1, inner_state="pullback")),
        ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, inner_state="pullback")),
    ],
)
def test_isa_levels_bit_identical(restore_isa, kind: str, hyper: dict, dtype: torch.dtype) -> None:
    levels = _C.build_info()["cpu_isas_supported"]
    if len(levels) < 2:
        pytest.skip(f"one ISA level runs here: {levels}")
    results = {}
    for level in levels:
        _C.cpu_set_isa(level)
        results[level] = _isa_run(kind, dtype, hyper)
    first = levels[0]
    for level in levels[1:]:
        for i, (a, b) in enumerate(zip(results[first], results[level], strict=True)):
            assert torch.equal(a, b), f"{level} differs from {first} in tensor {i}"


@pytest.mark.parametrize("level", ["x86-64", "bogus"])
def test_isa_chosen_by_environment_variable(level: str) -> None:
    """LOOKAHEAD_FUSED_CPU_ISA picks the level at import; an unknown one is a clear error."""
    import os
    import subprocess
    import sys

    if level not in _C.build_info().get("cpu_isas", []) and level != "bogus":
        pytest.skip(f"{level} is not built here")
    code = "import lookahead_fused.backends.cpu; from lookahead_fused import _C; print(_C.cpu_isa())"
    env = {**os.environ, "LOOKAHEAD_FUSED_CPU_ISA": level}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if level == "bogus":
        assert out.returncode != 0 and "LOOKAHEAD_FUSED_CPU_ISA='bogus'" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == level
