"""The traffic proof of the Triton backend: the fusion claim shown without a GPU.

Under TRITON_INTERPRET=1 every tl.load / tl.store of a kernel goes through the interpreter's
builder with the array of addresses it touches and its mask. The `traffic()` context manager
wraps those two methods (and the grid launcher, to count launches) and attributes every byte
to the tensor whose memory it falls in. A test then asserts, per bucket and per step:
- every parameter-shaped buffer is read and written exactly the minimum number of times
  (the model below: the bytes a step cannot avoid), so the totals per element are the
  minimum DESIGN §4 states: fp32 Adam 28 B plain / 36 B sync, SGD with momentum 20 / 28 B,
  plain SGD 12 / 20 B, +8 B with amsgrad, +8 B for the pullback cache on sync steps only,
  2-byte θ and g for bf16 parameters;
- gradients are never written;
- everything else (tables, counters, found_inf) is a few bytes per program or per
  parameter tensor, not per element;
- one fused launch per bucket per step, plus the tiny counter launch.
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends

pytestmark = pytest.mark.skipif(
    backends.unavailable("triton", torch.device("cpu")) is not None,
    reason="needs triton under TRITON_INTERPRET=1 (the traffic is counted by its interpreter)",
)

CLASSES = {"sgd": LookaheadSGD, "adam": LookaheadAdam, "adamw": LookaheadAdamW}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks per program and several programs per large tensor, as on a GPU."""
    from lookahead_fused.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "BLOCK", 128)
    monkeypatch.setattr(triton_backend, "CHUNK", 512)


# Several chunks and a partial last block in the large one; tiny tensors beside it.
SHAPES = [(40, 30), (300,), (5,), ()]


@dataclass
class Traffic:
    regions: dict[str, tuple[int, int]]  # name -> [start, end) addresses
    loads: Counter = field(default_factory=Counter)  # name -> bytes ("other" outside every region)
    stores: Counter = field(default_factory=Counter)
    launches: Counter = field(default_factory=Counter)  # kernel name -> launches

    def add(self, into: Counter, addresses: np.ndarray, mask: np.ndarray, size: int) -> None:
        touched = np.asarray(addresses).reshape(-1)[np.asarray(mask, dtype=bool).reshape(-1)]
        for address in touched:
            into[self._name(int(address))] += size

    def _name(self, address: int) -> str:
        for name, (start, end) in self.regions.items():
            if start <= address < end:
                return name
        return "other"


@contextlib.contextmanager
def traffic(regions: dict[str, Tensor]) -> Iterator[Traffic]:
    """Count the bytes every kernel launched inside the `with` loads from and stores to each
    of `regions` (name -> tensor), and the launches per kernel."""
    from triton.runtime import interpreter

    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in regions.items()}
    counted = Traffic(spans)
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    load, store, launch = builder.create_masked_load, builder.create_masked_store, executor.__call__

    # (ptrs, mask, ...) first; the other arguments differ between Triton versions (3.6 has one more).
    def counting_load(self, ptrs, mask, *rest):  # noqa: ANN001, ANN202
        counted.add(counted.loads, ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8)
        return load(self, ptrs, mask, *rest)

    def counting_store(self, ptrs, value, mask, *rest):  # noqa: ANN001, ANN202
        counted.add(counted.stores, ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8)
        return store(self, ptrs, value, mask, *rest)

    def counting_launch(self, *args, **kwargs):  # noqa: ANN001, ANN202
        counted.launches[self.fn.__name__] += 1
        return launch(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counting_load, counting_store
    executor.__call__ = counting_launch
    try:
        yield counted
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        executor.__call__ = launch


def minimum_traffic(kind: str, options: dict, sync: bool, param_bytes: int) -> tuple[dict, dict]:
    """The bytes per element a step cannot avoid, per buffer: (reads, writes).
    Inner step: read θ and g, write θ; read and write each moment the optimizer keeps.
    Sync step (Algorithm 1): also read and write φ; with inner_state="pullback" also read
    and write the momentum cache (the momentum itself is already read and written)."""
    reads = {"param": param_bytes, "grad": param_bytes}
    writes = {"param": param_bytes}
    moments = []
    if kind == "sgd":
        moments += ["momentum_buffer"] if options.get("momentum", 0) else []
    else:
        moments += ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if options.get("amsgrad") else [])
    for key in moments:
        reads[key] = writes[key] = 4
    if sync:
        reads["slow_weights"] = writes["slow_weights"] = 4
        momentum = "momentum_buffer" if kind == "sgd" else "exp_avg"
        if options.get("inner_state") == "pullback" and momentum in moments:
            reads["cached_" + momentum] = writes["cached_" + momentum] = 4
    return reads, writes


def _optimizer(kind: str, dtype: torch.dtype, **options):  # noqa: ANN003, ANN202
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    lr = 0.05 if kind == "sgd" else 0.01
    opt = CLASSES[kind](params, lr=lr, k=3, backend="triton", **options)
    return opt, params, gen


def _set_grads(params: list[Tensor], gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _regions(opt, params: list[Tensor]) -> dict[str, Tensor]:  # noqa: ANN001
    """Every parameter, gradient and flat state buffer of the optimizer's one bucket, by role."""
    (bucket,) = opt._group_buckets[0]
    regions: dict[str, Tensor] = {f"param{i}": p for i, p in enumerate(params)}
    regions.update({f"grad{i}": p.grad for i, p in enumerate(params)})
    regions.update(bucket.flat)
    return regions


def _per_buffer(counts: Counter, numel: int) -> dict[str, float]:
    """Bytes per element for each role, parameters and gradients summed over the tensors."""
    out: dict[str, int] = defaultdict(int)
    for name, nbytes in counts.items():
        if name.startswith("param") or name.startswith("grad"):
            out[name.rstrip("0123456789")] += nbytes
        elif name not in ("step", "lookahead_step", "other"):
            out[name] += nbytes
    return {name: nbytes / numel for name, nbytes in out.items()}


VARIANTS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {}),
    ("adam", {"amsgrad": True, "weight_decay": 0.01}),
    ("adamw", {"weight_decay": 0.1, "maximize": True}),
]


@pytest.mark.parametrize("inner_state", ["maintain", "reset", "pullback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("kind", "options"), VARIANTS, ids=lambda x: x if isinstance(x, str) else repr(x))
def test_triton_minimum_bytes_per_element(kind: str, options: dict, dtype: torch.dtype, inner_state: str) -> None:
    options = {**options, "inner_state": inner_state}
    opt, params, gen = _optimizer(kind, dtype, **options)
    numel = sum(p.numel() for p in params)
    programs_bound = 16  # chunks of the bucket: a few per large tensor, one per small one

    _set_grads(params, gen)
    opt.step()  # step 1: SGD's first step reads no momentum buffer (it is the gradient)
    for sync in (False, True):  # step 2: plain; step 3: sync (k = 3)
        _set_grads(params, gen)
        with traffic(_regions(opt, params)) as t:
            opt.step()
        reads, writes = minimum_traffic(kind, options, sync, dtype.itemsize)
        assert _per_buffer(t.loads, numel) == reads
        assert _per_buffer(t.stores, numel) == writes  # "grad" absent: gradients are never written
        assert t.launches == {"lookahead_step_kernel": 1, "advance_counters_kernel": 1}
        # Tables, counters, found_inf: bytes per program or per tensor, not per element.
        metadata = t.loads["other"] + t.loads["step"] + t.loads["lookahead_step"]
        assert metadata <= programs_bound * 64 + len(params) * 16
        assert t.stores["other"] == 0 and t.stores["step"] + t.stores["lookahead_step"] == 8 * len(params)


@pytest.mark.parametrize(
    ("kind", "options", "plain", "sync"),
    [
        ("adam", {}, 28, 36),
        ("adamw", {}, 28, 36),
        ("sgd", {"momentum": 0.9}, 20, 28),
        ("sgd", {}, 12, 20),
        ("adam", {"amsgrad": True}, 36, 44),
        ("adam", {"inner_state": "pullback"}, 28, 44),
        ("sgd", {"momentum": 0.9, "inner_state": "pullback"}, 20, 36),
    ],
)
def test_triton_fp32_totals_are_the_design_minimum(kind: str, options: dict, plain: int, sync: int) -> None:
    """The headline numbers of DESIGN §4 (fp32), stated independently of the model above."""
    for is_sync, want in ((False, plain), (True, sync)):
        reads, writes = minimum_traffic(kind, options, is_sync, 4)
        assert sum(reads.values()) + sum(writes.values()) == want
    opt, params, gen = _optimizer(kind, torch.float32, **options)
    numel = sum(p.numel() for p in params)
    _set_grads(params, gen)
    opt.step()
    totals = []
    for _ in range(2):  # steps 2 (plain) and 3 (sync)
        _set_grads(params, gen)
        with traffic(_regions(opt, params)) as t:
            opt.step()
        totals.append(sum(_per_buffer(t.loads, numel).values()) + sum(_per_buffer(t.stores, numel).values()))
    assert totals == [plain, sync]


def test_triton_device_path_plain_step_does_not_touch_slow_weights() -> None:
    """With GradScaler's found_inf the sync is decided on the device; a plain step still moves
    only the minimum (its slow-weight accesses are masked off), and a skipped step nothing."""
    opt, params, gen = _optimizer("adam", torch.float32)
    numel = sum(p.numel() for p in params)
    _set_grads(params, gen)
    opt.step()  # builds the bucket; the next step is plain (k = 3)
    reads, writes = minimum_traffic("adam", {}, False, 4)
    for found_inf, want_reads, want_writes in ((1.0, {}, {}), (0.0, reads, writes)):
        _set_grads(params, gen)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(found_inf)
        with traffic(_regions(opt, params)) as t:
            opt.step()
        del opt.grad_scale, opt.found_inf
        assert _per_buffer(t.loads, numel) == want_reads
        assert _per_buffer(t.stores, numel) == want_writes


def test_triton_adaptive_alpha_costs_one_extra_pass_on_sync_steps() -> None:
    """Adaptive α: the sync step's first pass reads φ for the dot products, the second does
    the sync once α̂ is known (θ and φ read and written again); plain steps are unchanged."""
    opt, params, gen = _optimizer("adam", torch.float32, adaptive_alpha=True)
    numel = sum(p.numel() for p in params)
    _set_grads(params, gen)
    opt.step()
    for sync in (False, True):
        _set_grads(params, gen)
        with traffic(_regions(opt, params)) as t:
            opt.step()
        reads, writes = minimum_traffic("adam", {}, False, 4)
        if sync:
            reads = {**reads, "slow_weights": 4 + 4, "param": 4 + 4}
            writes = {**writes, "slow_weights": 4, "param": 4 + 4}
        assert _per_buffer(t.loads, numel) == reads
        assert _per_buffer(t.stores, numel) == writes
        assert t.launches["lookahead_step_kernel"] == (2 if sync else 1)


def test_triton_resnet152_sized_bucket_is_one_launch_per_step() -> None:
    """467 parameter tensors in one bucket (ResNet-152's count, tiny sizes to keep the
    interpreter fast): one fused launch per step, sync steps included."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(1 + i % 7, generator=gen).requires_grad_() for i in range(467)]
    opt = LookaheadSGD(params, lr=0.1, momentum=0.9, k=2, backend="triton")
    for _ in range(2):
        _set_grads(params, gen)
        with traffic({}) as t:
            opt.step()
        assert t.launches == {"lookahead_step_kernel": 1, "advance_counters_kernel": 1}
    assert opt._group_buckets[0][0].backend_cache["builds"] == 1
