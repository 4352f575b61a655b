"""`capturable=True`: once warmed up, a step neither reads a device value on the host nor
copies host data to the device, which is what CUDA graph capture requires.

Proven here for every backend that runs on this machine's CPU, under `tests.nosync.no_host_sync()`:
- "foreach" and "triton" decide everything on the device in Python-visible torch calls: the
  mode sees every op they issue, so a sync would be caught;
- "cuda_emulated" runs the CUDA backend's Python side unchanged (tables, launch arguments, a
  tensor lr and GradScaler's tensors passed by address) and the CUDA kernels compiled for the
  host. The mode sees the Python side; the kernels are C++ called through pybind11, which the
  mode cannot see, but they take only addresses and decide on the "device" by construction
  (csrc/cuda/lookahead_kernels.cu reads lr, found_inf and the counters from memory);
- "cpu" and "eager" read the counters, found_inf and a tensor lr on the host (`.item()`) by
  design: on a CPU there is no device to wait for, and "eager" is the specification. Their
  test asserts that the mode catches them, so the guard is known to fire on a real step.

Each step is also compared with the reference run outside the mode, so a sync-free step that
computed the wrong thing fails too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import operator
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD
from lookahead_fused.testing import TOLERANCES

from .conftest import usable_backends
from .nosync import HostSyncError, no_host_sync

# Backends whose warmed-up capturable step must not sync; the others sync by design.
SYNC_FREE = ("foreach", "triton", "cuda_emulated", "cuda")
HOST_DECIDES = ("cpu", "eager")

CLASSES = {
    "sgd": (LookaheadSGD, dict(momentum=0.9)),
    "adam": (LookaheadAdam, dict(amsgrad=True)),
    "adamw": (LookaheadAdamW, dict(weight_decay=0.1)),
}
K = 2  # every other step is a sync step


# ---------------------------------------------------------------------------------------
# The guard itself: every operation it promises to forbid raises, ordinary ops do not.
# ---------------------------------------------------------------------------------------

_X = torch.arange(4.0)
_MASK = torch.tensor([True, False, True, False])
_META = torch.empty(4, device="meta")
_REPEATS = torch.tensor([1, 2, 1, 0])

FORBIDDEN: dict[str, Callable[[], object]] = {
    "item": lambda: _X.sum().item(),
    "bool": lambda: bool(_X.sum()),
    "if": lambda: 1 if _X[0] == 0 else 0,
    "float": lambda: float(_X.sum()),
    "int": lambda: int(_X.sum()),
    "complex": lambda: complex(_X.sum()),
    "index": lambda: [0, 1, 2][_X[1].long()],
    "range": lambda: range(_X[2].long()),
    "tolist": lambda: _X.tolist(),
    "numpy": lambda: _X.numpy(),
    "np.asarray": lambda: np.asarray(_X),
    "nonzero": lambda: _X.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(_X),
    "masked_select": lambda: _X.masked_select(_MASK),
    "unique": lambda: _X.unique(),
    "unique_consecutive": lambda: torch.unique_consecutive(_X),
    "bool-mask read": lambda: _X[_MASK],
    "bool-mask write": lambda: _X.clone().__setitem__(_MASK, 0.0),
    "repeat_interleave": lambda: torch.repeat_interleave(_X, _REPEATS),
    "torch.tensor": lambda: torch.tensor([1.0]),
    "torch.as_tensor": lambda: torch.as_tensor([1.0]),
    "new_tensor": lambda: _X.new_tensor([1.0]),
    # "meta" stands in for a second device on a CPU-only machine.
    "to(device)": lambda: _X.to("meta"),
    "to(device=)": lambda: _X.to(device=torch.device("meta")),
    "to(tensor)": lambda: _X.to(_META),
    "meta.to(cpu)": lambda: _META.to("cpu"),
    "cpu()": lambda: _META.cpu(),
    "cuda()": lambda: _X.cuda(),
    "copy_ in": lambda: torch.empty(4, device="meta").copy_(_X),
    "copy_ out": lambda: torch.empty(4).copy_(_META),
}

ALLOWED: dict[str, Callable[[], object]] = {
    "arithmetic": lambda: (_X * 2 + 1).sum(),
    "where": lambda: torch.where(_MASK, _X, 0.0),
    "integer index": lambda: _X[1:3],
    "to(dtype)": lambda: _X.to(torch.float64),
    "to(same device)": lambda: _X.to("cpu"),
    "copy_ same device": lambda: torch.empty(4).copy_(_X),
    "repeat_interleave output_size": lambda: torch.repeat_interleave(_X, _REPEATS, output_size=4),
}


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_no_host_sync_catches(what: str) -> None:
    with no_host_sync(), pytest.raises(HostSyncError, match="not allowed inside no_host_sync"):
        FORBIDDEN[what]()


@pytest.mark.parametrize("what", list(ALLOWED))
def test_no_host_sync_allows_device_only_ops(what: str) -> None:
    with no_host_sync():
        ALLOWED[what]()


def test_no_host_sync_is_off_outside_the_with() -> None:
    with no_host_sync():
        pass
    assert _X.sum().item() == 6.0 and torch.tensor([1.0]).tolist() == [1.0]


# ---------------------------------------------------------------------------------------
# The capturable step.
# ---------------------------------------------------------------------------------------


def _params(seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (33,), (2, 3, 2, 2)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    params[2] = params[2].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return params


def _make(kind: str, backend: str, params: list[Tensor]) -> torch.optim.Optimizer:
    cls, options = CLASSES[kind]
    return cls(params, lr=torch.tensor(0.05), k=K, capturable=True, backend=backend, **options)


class _Loop:
    """Steps on static buffers, as a CUDA graph replays them: the gradients, GradScaler's
    tensors and the lr are rewritten in place between steps, never reallocated."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[Tensor], scaled: bool) -> None:
        self.opt, self.params, self.scaled = opt, params, scaled
        self.grads = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, self.grads, strict=True):
            p.grad = g
        self.scale, self.found_inf = torch.ones(()), torch.zeros(())
        if scaled:
            opt.grad_scale, opt.found_inf = self.scale, self.found_inf

    def run(self, steps: range, guard: bool = False) -> None:
        lr = self.opt.param_groups[0]["lr"]
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            for g in self.grads:
                g.copy_(torch.randn(g.shape, generator=gen))
            if self.scaled:
                self.scale.fill_(2.0**step)
                for g in self.grads:
                    g.mul_(self.scale)
                self.found_inf.fill_(1.0 if step == 3 else 0.0)  # step 3 overflowed: skipped
            lr.fill_(0.05 / (1 + step))  # a schedule, through the tensor the step reads
            with no_host_sync() if guard else contextlib.nullcontext():
                self.opt.step()


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_capturable_step_does_not_sync(backend: str, kind: str, scaled: bool) -> None:
    """Warm-up step outside the guard (it builds the tables: a host-to-device copy, as before a
    capture), then plain and sync steps, one of them skipped by found_inf, inside it."""
    params, want_params = _params(0), _params(0)
    opt = _make(kind, backend, params)
    want = _make(kind, "eager", want_params)
    _Loop(want, want_params, scaled).run(range(6))
    loop = _Loop(opt, params, scaled)
    loop.run(range(1))
    if backend in HOST_DECIDES:
        with pytest.raises(HostSyncError, match="item"):
            loop.run(range(1, 6), guard=True)
        return
    assert backend in SYNC_FREE, f"classify backend {backend!r} in this test"
    loop.run(range(1, 6), guard=True)
    for p, q in zip(params, want_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
        for key, value in want.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, **TOLERANCES[torch.float32], msg=key)
    skipped = 1 if scaled else 0
    assert int(opt.state[params[0]]["lookahead_step"]) == 6 - skipped


def test_every_usable_backend_is_classified() -> None:
    assert set(usable_backends()) <= set(SYNC_FREE) | set(HOST_DECIDES)


# ---------------------------------------------------------------------------------------
# examples/cuda_graph_step.py, in its CPU dry run.
# ---------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cuda_graph_step.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cuda_graph_step", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", [b for b in ("cuda_emulated", "foreach") if b in usable_backends()])
def test_cuda_graph_example_dry_run(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The example's step, run without capture on CPU: every replay inside no_host_sync(), the
    loss goes down, and the lr the step reads is the one the loop wrote."""
    example = _example()
    losses = example.main(["--dry-run-cpu", "--backend", backend, "--steps", "30"], guard=no_host_sync)
    assert len(losses) == 30 and all(map(np.isfinite, losses))
    assert losses[-1] < 0.5 * losses[0]
    out = capsys.readouterr().out
    assert "dry run" in out and f"backend={backend}" in out


def test_cuda_graph_example_without_gpu_exits_0(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """Run as a script on a machine without CUDA, it says what it needs and exits with status 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert done.value.code == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_example_captures_and_replays_on_gpu() -> None:
    losses = _example().main(["--steps", "100"])
    assert len(losses) == 100 and losses[-1] < 0.5 * losses[0]


def test_example_source_uses_the_capture_api() -> None:
    """The GPU path of the example is not run on CPU CI; at least its calls are the real ones."""
    source = EXAMPLE.read_text()
    for call in ("torch.cuda.graph(", "torch.cuda.CUDAGraph()", "graph.replay", "wait_stream", "capturable=True"):
        assert call in source, call
    assert all(callable(operator.attrgetter(name)(torch)) for name in ("cuda.graph", "cuda.CUDAGraph", "cuda.Stream"))


# ---------------------------------------------------------------------------------------
# A step that builds tables may queue uploads, never wait for them (no_host_sync(async_uploads=True)).
# ---------------------------------------------------------------------------------------

_PAGEABLE = torch.arange(4.0)
_PINNED = torch.arange(4.0)  # stands in for pinned memory (which needs an accelerator)


def _is_pinned(t: Tensor) -> bool:
    return t.untyped_storage().data_ptr() == _PINNED.untyped_storage().data_ptr()


ASYNC_ALLOWED: dict[str, Callable[[], object]] = {
    "pinned copy_ non_blocking": lambda: torch.empty(4, device="meta").copy_(_PINNED, non_blocking=True),
    "pinned copy_ positional": lambda: torch.empty(4, device="meta").copy_(_PINNED, True),
    "pinned to non_blocking": lambda: _PINNED.to("meta", non_blocking=True),
    "pinned to(device, dtype, True)": lambda: _PINNED.to("meta", torch.float32, True),
    "host tensor from Python data": lambda: torch.tensor([1.0]),
    "host copy_": lambda: torch.empty(4).copy_(_PAGEABLE),
}
ASYNC_FORBIDDEN: dict[str, Callable[[], object]] = {
    "pageable copy_ non_blocking": lambda: torch.empty(4, device="meta").copy_(_PAGEABLE, non_blocking=True),
    "pinned copy_ blocking": lambda: torch.empty(4, device="meta").copy_(_PINNED),
    "pageable to": lambda: _PAGEABLE.to("meta"),
    "pinned to blocking": lambda: _PINNED.to(device="meta"),
    "device tensor from Python data": lambda: torch.tensor([1.0], device="meta"),
    "device to host": lambda: torch.empty(4).copy_(_META, non_blocking=True),
    "cpu()": lambda: _META.cpu(),
    "item": lambda: _X.sum().item(),
}


@pytest.mark.parametrize("what", list(ASYNC_ALLOWED))
def test_async_uploads_allows_queued_copies_from_pinned_memory(what: str) -> None:
    with no_host_sync(async_uploads=True, pinned=_is_pinned):
        ASYNC_ALLOWED[what]()


@pytest.mark.parametrize("what", list(ASYNC_FORBIDDEN))
def test_async_uploads_catches_copies_the_host_waits_for(what: str) -> None:
    with no_host_sync(async_uploads=True, pinned=_is_pinned), pytest.raises(HostSyncError, match="not allowed"):
        ASYNC_FORBIDDEN[what]()


class _FakeEvent:
    done = True  # what query() answers: the copy recorded before it has completed

    def record(self, stream: object) -> None:
        pass

    def query(self) -> bool:
        return _FakeEvent.done


class _FakeAccelerator:
    """The callees of the cuda backend's `_Staging.upload` that need a GPU, replaced: pinned
    memory by host tensors remembered as pinned, CUDA events by `_FakeEvent`; "meta" stands
    in for the CUDA device. Everything else in the upload is the backend's own code."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from lookahead_fused.backends import cuda

        self.cuda, self.storages, self.uploads = cuda, set(), 0
        monkeypatch.setattr(cuda, "_pinned_empty", self._pinned_empty)
        monkeypatch.setattr(cuda, "_new_event", _FakeEvent)
        monkeypatch.setattr(cuda, "_current_stream", lambda device: None)
        monkeypatch.setattr(_FakeEvent, "done", True)

    def _pinned_empty(self, n: int, dtype: torch.dtype) -> Tensor:
        t = torch.empty(n, dtype=dtype)
        self.storages.add(t.untyped_storage().data_ptr())
        return t

    def pinned(self, t: Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.storages

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return no_host_sync(async_uploads=True, pinned=self.pinned)

    def route_uploads(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """cuda_emulated's tables go through the GPU path of the upload (to "meta", inside the
        guard); the kernels, which run on the host, get a host copy."""
        real = self.cuda._Staging.upload

        def upload(staging: object, host: Tensor, device: torch.device) -> Tensor:
            out = real(staging, host, torch.device("meta"))
            assert out.device.type == "meta" and out.shape == host.shape
            self.uploads += 1
            return host.clone()  # host to host: the guard lets it through

        monkeypatch.setattr(self.cuda._Staging, "upload", upload)


def test_table_upload_is_asynchronous_from_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda backend's table upload (_Staging.upload) on a stand-in device: staged in pinned
    memory, copied with non_blocking=True; the buffer is reused once its copy is done, and a
    new one taken while it is in flight. A blocking or pageable copy would raise here."""
    fake = _FakeAccelerator(monkeypatch)
    staging = fake.cuda._Staging()
    host = torch.arange(12, dtype=torch.int64).reshape(6, 2)
    with fake.guard():
        out = staging.upload(host, torch.device("meta"))
        first = staging.buffer
        staging.upload(host, torch.device("meta"))
        assert staging.buffer is first  # the event said the copy was done
        _FakeEvent.done = False
        staging.upload(host, torch.device("meta"))
        assert staging.buffer is not first  # still in flight: a new buffer
    assert out.device.type == "meta" and out.shape == host.shape
    assert fake.pinned(first) and not fake.pinned(host)


@pytest.mark.skipif("cuda_emulated" not in usable_backends(), reason="needs _C")
@pytest.mark.parametrize("adaptive", [False, True])
def test_table_building_steps_make_no_blocking_upload(monkeypatch: pytest.MonkeyPatch, adaptive: bool) -> None:
    """The cuda backend's Python on the steps that build tables (the first step; a step with new
    gradient tensors), run as cuda_emulated with its uploads
    through the GPU path: no host sync and no copy the host waits for."""
    fake = _FakeAccelerator(monkeypatch)
    fake.route_uploads(monkeypatch)
    params, want_params = _params(0), _params(0)
    opt = LookaheadAdam(params, lr=torch.tensor(0.05), k=K, capturable=True, adaptive_alpha=adaptive,
                        backend="cuda_emulated")  # fmt: skip
    want = LookaheadAdam(want_params, lr=torch.tensor(0.05), k=K, adaptive_alpha=adaptive, backend="eager")
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, q, g in zip(params, want_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()  # new gradient tensors: new segment tables
        with fake.guard():
            opt.step()
        want.step()
    assert fake.uploads >= 5  # chunk table and segment table, then a segment table per step
    for p, q in zip(params, want_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
