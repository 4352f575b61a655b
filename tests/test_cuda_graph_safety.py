"""CUDA-graph safety of the "cuda" backend's tables, on the backend "cuda_emulated" (which runs
the same Python, backends/cuda.py, on CPU tensors) with `torch.cuda.is_current_stream_capturing`
patched to say "capturing".

A captured graph holds the raw addresses of the segment and chunk tables that the capture's
launches read. So:
- during a capture, a table that would need a rebuild (a parameter replaced) or a new
  gradient column (a gradient that moved, appeared or went away) is an error that says what
  changed, raised before anything is launched (the rebuild would be a host-to-device copy,
  which capture forbids, and the graph would read tables that later steps overwrite);
- tables used by a capture are never written in place afterwards, and stay referenced for the
  bucket's life: an eager step that needs other tables builds new tensors (copy-on-write);
- gradient tables are kept by key (a few recent layouts), so alternating gradient buffers
  do not rebuild (and re-upload) a table at every step.
"""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadSGD, backends

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    backends.unavailable("cuda_emulated", CPU) is not None, reason="cuda_emulated is not built"
)


def _capturing(monkeypatch: pytest.MonkeyPatch, on: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


def _setup(adaptive: bool = False) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.randn(40).requires_grad_(), torch.randn(5, 7).requires_grad_(), torch.randn(300).requires_grad_()]
    opt = LookaheadAdam(params, lr=torch.tensor(0.01), k=2, capturable=True, adaptive_alpha=adaptive,
                        backend="cuda_emulated")  # fmt: skip
    for p in params:  # static gradient buffers, as a captured training step uses
        p.grad = torch.randn_like(p)
    for _ in range(3):  # warm-up: builds the tables
        opt.step()
    return opt, params


def _cache(opt: torch.optim.Optimizer) -> dict:
    (buckets,) = opt._group_buckets
    (b,) = buckets
    return b.backend_cache


def _snapshot(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    (buckets,) = opt._group_buckets
    return [p.detach().clone() for p in params] + [t.clone() for b in buckets for t in b.flat.values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("change", ["moved", "gone", "strides"])
def test_gradient_change_during_capture_is_a_clear_error(monkeypatch, adaptive: bool, change: str) -> None:
    opt, params = _setup(adaptive)
    before = _snapshot(params, opt)
    if change == "moved":
        params[1].grad = torch.randn_like(params[1])  # a new tensor: zero_grad(set_to_none=True)
    elif change == "gone":
        params[1].grad = None
    else:
        params[1].grad = torch.randn(7, 5).t()  # same shape, other strides
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match=r"gradient of parameter 1 of shape \(5, 7\) .*since the graph's warm-up"):
        opt.step()
    assert _same(before, _snapshot(params, opt)), "nothing may be launched before the error"


def test_parameter_replaced_during_capture_is_a_clear_error(monkeypatch) -> None:
    opt, params = _setup()
    params[2].data = params[2].data.clone()  # the same parameter, new storage
    before = _snapshot(params, opt)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match=r"parameter 2 of shape \(300,\) moved .*since the graph's warm-up"):
        opt.step()
    assert _same(before, _snapshot(params, opt))


def test_capture_without_warm_up_is_a_clear_error(monkeypatch) -> None:
    p = torch.randn(10).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, backend="cuda_emulated")
    p.grad = torch.randn(10)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="warm-up"):
        opt.step()


def test_a_steady_capture_is_allowed(monkeypatch) -> None:
    """The same gradient buffers, rewritten in place, as a graph replays them: no error, and
    the tables are reused, not rebuilt."""
    opt, params = _setup(adaptive=True)
    builds = _cache(opt)["cuda_builds"], _cache(opt)["cuda_grad_builds"]
    _capturing(monkeypatch)
    for p in params:
        p.grad.copy_(torch.randn_like(p))
    opt.step()
    assert (_cache(opt)["cuda_builds"], _cache(opt)["cuda_grad_builds"]) == builds


@pytest.mark.parametrize("adaptive", [False, True])
def test_captured_tables_are_never_rewritten(monkeypatch, adaptive: bool) -> None:
    opt, params = _setup(adaptive)
    static_grads = [p.grad for p in params]
    _capturing(monkeypatch)
    opt.step()  # "the capture"
    cache = _cache(opt)
    segments, chunks = cache["cuda_segments"], cache["cuda_chunks"]
    kept = segments.clone(), chunks.clone()
    _capturing(monkeypatch, False)

    # Eager steps that need other tables: gradients that moved, then a parameter replaced.
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(segments, kept[0]), "the captured segment table was rewritten in place"
    assert cache["cuda_segments"] is not segments
    params[0].data = params[0].data.clone()
    opt.step()
    assert cache["cuda_chunks"] is not chunks
    for _ in range(6):  # more layouts than the tables kept by key
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    assert torch.equal(segments, kept[0]) and torch.equal(chunks, kept[1]), "captured tables were rewritten"
    captured = list(cache["cuda_captured"].values())
    assert any(t is segments for t in captured) and any(t is chunks for t in captured)
    assert len(static_grads) == 3  # kept alive: later gradients get new addresses


def test_gradient_tables_are_kept_by_key() -> None:
    """Two gradient buffers used in turn (double buffering): two tables, built once each."""
    opt, params = _setup()
    cache = _cache(opt)
    first = [p.grad for p in params]
    second = [torch.randn_like(p) for p in params]
    builds = cache["cuda_grad_builds"]
    for step in range(6):
        for p, a, b in zip(params, first, second, strict=True):
            p.grad = a if step % 2 else b
        opt.step()
    assert cache["cuda_grad_builds"] == builds + 1
    assert cache["cuda_builds"] == 1


def test_eager_steps_with_moving_gradients_after_a_capture_match_eager(monkeypatch) -> None:
    """Copy-on-write does not change the numbers: a run with a "capture" in the middle and
    gradients that move afterwards equals a run without it."""

    def run(capture: bool) -> list[torch.Tensor]:
        opt, params = _setup(adaptive=True)
        if capture:
            _capturing(monkeypatch)
        opt.step()
        _capturing(monkeypatch, False)
        gen = torch.Generator().manual_seed(3)
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 2:
                params[1].data = params[1].data.clone()
            opt.step()
        return [p.detach().clone() for p in params]

    assert _same(run(True), run(False))


# ---------------------------------------------------------------------------------------
# The Triton backend (under the interpreter), and what the other backends do under capture.
# ---------------------------------------------------------------------------------------

_triton_missing = backends.unavailable("triton", CPU)


def _triton_setup(capturable: bool = True) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.randn(40).requires_grad_(), torch.randn(5, 7).requires_grad_()]
    opt = LookaheadAdam(params, lr=0.01, k=2, capturable=capturable, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    return opt, params


@pytest.mark.skipif(_triton_missing is not None, reason=f"triton cannot run here: {_triton_missing}")
@pytest.mark.parametrize("change", ["grad moved", "grad gone", "param moved"])
def test_triton_table_change_during_capture_is_a_clear_error(monkeypatch, change: str) -> None:
    opt, params = _triton_setup()
    if change == "grad moved":
        params[1].grad = torch.randn_like(params[1])
        match = r"triton backend .*gradient of parameter 1 of shape \(5, 7\) moved"
    elif change == "grad gone":
        params[1].grad = None
        match = r"gradient of parameter 1 of shape \(5, 7\) went away"
    else:
        params[0].data = params[0].data.clone()
        match = r"parameter 0 of shape \(40,\) moved .*since the graph's warm-up"
    before = _snapshot(params, opt)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert _same(before, _snapshot(params, opt)), "nothing may be launched before the error"


@pytest.mark.skipif(_triton_missing is not None, reason=f"triton cannot run here: {_triton_missing}")
def test_triton_captured_tables_outlive_eviction(monkeypatch) -> None:
    """The gradient-address vector a graph was captured with stays referenced after more
    gradient layouts than the backend keeps have come and gone (else the graph would read
    freed memory), and the captured chunk table after a parameter was replaced."""
    opt, params = _triton_setup()
    _capturing(monkeypatch)
    opt.step()
    _capturing(monkeypatch, False)
    cache = _cache(opt)
    (vector, *_) = cache["triton_grads"][cache["triton_grads_last"]]
    table = cache["triton_table"][0]
    for _ in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    params[0].data = params[0].data.clone()
    opt.step()
    assert all(entry[0] is not vector for entry in cache["triton_grads"].values()), "not evicted: no test"
    assert cache["triton_table"][0] is not table
    captured = list(cache["triton_captured"].values())
    assert any(t is vector for t in captured) and any(t is table for t in captured)


@pytest.mark.skipif(_triton_missing is not None, reason=f"triton cannot run here: {_triton_missing}")
def test_triton_capture_takes_the_device_path_even_without_capturable(monkeypatch) -> None:
    """capturable=False would decide the sync on the host and bake it into the graph."""
    from lookahead_fused import triton_kernels
    from lookahead_fused.backends import triton as triton_backend

    opt, params = _triton_setup(capturable=False)
    modes = []
    real = triton_backend.step_constexprs
    monkeypatch.setattr(triton_backend, "step_constexprs", lambda *a, **k: modes.append(k["mode"]) or real(*a, **k))
    opt.step()
    _capturing(monkeypatch)
    opt.step()
    assert modes[0] != triton_kernels.SYNC_DEVICE and modes[-1] == triton_kernels.SYNC_DEVICE


def test_foreach_capture_takes_the_device_path_even_without_capturable(monkeypatch) -> None:
    from lookahead_fused.backends import foreach

    p = torch.randn(10).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, momentum=0.9, k=2, backend="foreach")
    p.grad = torch.randn(10)
    opt.step()
    seen = []
    real = foreach._Context.make
    monkeypatch.setattr(
        foreach._Context, "make", lambda b, g, on_device, *a: seen.append(on_device) or real(b, g, on_device, *a)
    )
    _capturing(monkeypatch)
    opt.step()
    assert seen == [True]


def test_eager_backend_refuses_capture_clearly(monkeypatch) -> None:
    p = torch.randn(10).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, backend="eager")
    p.grad = torch.randn(10)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="eager backend .* cannot be captured"):
        opt.step()
