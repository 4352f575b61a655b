"""Device placement of the "cuda" backend's launches (backends/cuda.py), without a GPU.

A group whose parameters sit on several GPUs has one bucket per device. Every launch of a
bucket must name that bucket's device and the current stream of that device, and hand over
only addresses of memory on that device: its own tables, state, parameters and gradients,
its own copies of GradScaler's scalars and of a tensor lr, and, for adaptive α, partial sums
and α̂ on its own device (combined on the group's first device in stream order, the α̂ copied
back before the second pass).

Here the same Python runs on the host build of the kernels (cuda_emulated) with a second
"device" made up for one bucket: `torch.device("cpu", 0)` is not equal to `torch.device("cpu")`
but holds CPU tensors, so every comparison of devices in backends/cuda.py sees two devices,
while the memory stays readable by the emulated kernels. The target's stream and device-index
functions tell the two apart; a recorder wraps the kernel entry points. The C++ side sets the
device of each launch itself (a device guard in csrc/cuda).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lookahead_fused import LookaheadAdam, backends
from lookahead_fused._buckets import Bucket, build_buckets

CPU = torch.device("cpu")
if backends.unavailable("cuda_emulated", CPU) is not None:
    pytest.skip("cuda_emulated is not built", allow_module_level=True)

from lookahead_fused import _C  # noqa: E402
from lookahead_fused.backends import cuda, cuda_emulated  # noqa: E402

SECOND = torch.device("cpu", 0)  # "the second GPU"
STREAMS = {CPU: 111, SECOND: 222}
INDEX = {CPU: 0, SECOND: 1}
ADDRESS_FIELDS = (
    *("segments", "chunks", "momentum", "cached_momentum", "exp_avg_sq", "max_exp_avg_sq", "slow", "step"),
    *("lookahead_step", "lr_ptr", "grad_scale_ptr", "found_inf_ptr", "partials", "alpha_ptr"),
)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def _ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    out = []
    for t in tensors:
        if t.numel():
            lo = t.untyped_storage().data_ptr()
            out.append((lo, lo + t.untyped_storage().nbytes()))
    return out


def _inside(address: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= address < hi for lo, hi in ranges)


class _Recorder:
    """Stands in for `_C.emulated_step` / `_C.emulated_finalize_alpha`: records the arguments
    (copied: the backend reuses the objects between passes) and runs the real kernel."""

    def __init__(self, real: Any, fields: tuple[str, ...]) -> None:
        self.real, self.fields, self.calls = real, fields, []

    def __call__(self, args: Any) -> None:
        self.calls.append({f: getattr(args, f) for f in self.fields})
        self.real(args)


def _run(monkeypatch: pytest.MonkeyPatch, spread: bool, steps: int = 4, scaled: bool = True):
    """Four steps (k=2) of adaptive-α Adam over a group of two buckets (fp32 and bf16), the
    second on SECOND when `spread`. Returns the buckets, their gradients, the records and the
    GradScaler / lr tensors handed in."""
    torch.manual_seed(0)
    params = [torch.randn(700), torch.randn(33), torch.randn(300, dtype=torch.bfloat16), torch.randn(9, 5)]
    params = [p.requires_grad_() for p in params]
    opt = LookaheadAdam(params, lr=torch.tensor(0.01), k=2, adaptive_alpha=True, alpha_low=0.1,
                        backend="cuda_emulated")  # fmt: skip
    group = opt.param_groups[0]
    buckets: list[Bucket] = build_buckets("adam", group, {})
    assert [b.dtype for b in buckets] == [torch.float32, torch.bfloat16]
    if spread:
        buckets[1].device = SECOND
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [b.grads("test") for b in buckets]

    target = dataclasses.replace(cuda_emulated.EMULATED, stream=STREAMS.__getitem__, index=INDEX.__getitem__)
    real_check = cuda.check_bucket
    # check_bucket compares every tensor's device with the bucket's: it sees CPU tensors.
    monkeypatch.setattr(cuda, "check_bucket", lambda name, b: real_check(name, dataclasses.replace(b, device=CPU)))
    launches = _Recorder(_C.emulated_step, (*ADDRESS_FIELDS, "device", "stream", "phase"))
    finals = _Recorder(_C.emulated_finalize_alpha, ("partials", "num_partials", "alpha_out", "device", "stream"))
    monkeypatch.setattr(_C, "emulated_step", launches)
    monkeypatch.setattr(_C, "emulated_finalize_alpha", finals)
    scale, found_inf = torch.tensor(1.0), torch.tensor(0.0)
    handed = (scale, found_inf) if scaled else (None, None)
    # Each launch may touch only the tensors of its own (emulated) device: "illegal address" else.
    with cuda_emulated.checked_memory(group, buckets, grads, *handed):
        for _ in range(steps):
            cuda.run_step(target, "adam", group, buckets, grads, *handed)
    monkeypatch.undo()
    return buckets, grads, launches.calls, finals.calls, [scale, found_inf, group["lr"]]


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
def test_every_launch_names_its_buckets_device_and_only_its_memory(monkeypatch, scaled: bool) -> None:
    buckets, grads, launches, finals, handed = _run(monkeypatch, spread=True, scaled=scaled)
    own = [_ranges(_tensors([b.flat, b.params, g, b.backend_cache])) for b, g in zip(buckets, grads, strict=True)]
    handed_ranges = _ranges(handed)  # GradScaler's scalars and the lr live on the first device
    own[0] += handed_ranges
    assert len(launches) == 4 * 2 * len(buckets) and len(finals) == 4  # 4 steps, two passes per bucket
    for n, call in enumerate(launches):
        i = n % len(buckets)  # each pass launches bucket 0, then bucket 1
        b = buckets[i]
        assert (call["device"], call["stream"]) == (INDEX[b.device], STREAMS[b.device]), (n, call)
        for field in ADDRESS_FIELDS:
            address = call[field]
            if address == 0:
                continue
            assert _inside(address, own[i]), f"launch {n} (bucket {i}) {field}: not memory of its device"
            assert not _inside(address, own[1 - i]), f"launch {n} (bucket {i}) {field}: memory of the other device"
            if b.device == SECOND:
                assert not _inside(address, handed_ranges), f"launch {n} {field}: a tensor of the first device"
    for call in finals:  # the finalize runs on the group's first device, on its memory
        assert (call["device"], call["stream"]) == (INDEX[CPU], STREAMS[CPU])
        assert _inside(call["partials"], own[0]) and _inside(call["alpha_out"], own[0])
        assert not _inside(call["partials"], own[1]) and not _inside(call["alpha_out"], own[1])


def test_a_group_spread_over_devices_steps_like_one_device(monkeypatch) -> None:
    """The partial sums of every device meet on the first device in launch order: α̂, and so
    every parameter and state entry, is bit for bit that of the same group on one device."""
    one, _, _, _, _ = _run(monkeypatch, spread=False)
    two, _, _, _, _ = _run(monkeypatch, spread=True)
    for a, b in zip(one, two, strict=True):
        for key in a.flat:
            assert torch.equal(a.flat[key], b.flat[key]), key
        for p, q in zip(a.params, b.params, strict=True):
            assert torch.equal(p, q)
    # and it moved: α̂ came out of the reduction, not a default
    assert not torch.equal(one[0].flat["slow_weights"], one[0].params[0].detach().new_zeros(one[0].numel))
