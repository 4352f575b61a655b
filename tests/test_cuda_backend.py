"""The "cuda" backend's kernels beyond the generic matrix (tests/test_backends.py and the rest
of the suite run every variant of them as "cuda_emulated"): memory traffic per element and
launches per step (counted by the emulated build's load/store helper), the vector and scalar
paths, chunks and grids, table caching, steps without host synchronisation, the determinism
of adaptive α, argument checks, and why "cuda" is or is not usable here."""

from __future__ import annotations

import pytest
import torch

from lookahead_fused import LookaheadAdam, LookaheadAdamW, LookaheadSGD, backends, reference
from lookahead_fused.testing import TOLERANCES, run_against_reference, variants
from tests.nosync import no_host_sync

CPU = torch.device("cpu")
if backends.unavailable("cuda_emulated", CPU) is not None:
    pytest.fail(f"cuda_emulated must be usable on CPU: {backends.unavailable('cuda_emulated', CPU)}")

from lookahead_fused import _C  # noqa: E402
from lookahead_fused.backends import cuda_emulated  # noqa: E402

CLASSES = {"sgd": LookaheadSGD, "adam": LookaheadAdam, "adamw": LookaheadAdamW}


def _buckets(opt):
    return [b for buckets in opt._group_buckets if buckets for b in buckets]


# ---------------------------------------------------------------------------------------
# Memory traffic: the minimum of DESIGN.md §4, per variant, counted in the kernels.
# ---------------------------------------------------------------------------------------

# (kind, options, the parameter-shaped buffers read and written besides θ and g)
TRAFFIC_VARIANTS = [
    ("sgd", {}, ()),
    ("sgd", {"momentum": 0.9}, ("m",)),
    ("sgd", {"momentum": 0.9, "inner_state": "pullback"}, ("m",)),
    ("adam", {}, ("m", "v")),
    ("adam", {"amsgrad": True}, ("m", "v", "vmax")),
    ("adamw", {"weight_decay": 0.1, "inner_state": "pullback"}, ("m", "v")),
    ("adamw", {"inner_state": "reset"}, ("m", "v")),
]


def _expected_bytes(param_bytes: int, state: tuple[str, ...], options: dict, sync: bool) -> tuple[int, int]:
    """(loaded, stored) bytes per element of the minimum traffic: θ and g read, θ written,
    every state buffer read and written, and on a sync step φ read and written plus, under
    pullback, the cache of m read and written. Never g written. State and φ are fp32."""
    loaded = 2 * param_bytes + 4 * len(state)
    stored = param_bytes + 4 * len(state)
    if sync:
        loaded, stored = loaded + 4, stored + 4
        if options.get("inner_state") == "pullback":
            loaded, stored = loaded + 4, stored + 4
    return loaded, stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "options", "state"), TRAFFIC_VARIANTS)
def test_traffic_per_element_is_the_minimum(kind, options, state, dtype) -> None:
    n = 4096  # aligned and a multiple of the vector width: every access is a vector
    p = torch.randn(n, dtype=dtype).requires_grad_()
    opt = CLASSES[kind]([p], lr=0.01, k=2, backend="cuda_emulated", **options)
    p.grad = torch.randn(n, dtype=dtype)
    grad_before = p.grad.clone()
    param_bytes = p.element_size()
    for sync in (False, True):  # step 1 is plain, step 2 (k=2) syncs
        _C.emulated_traffic_reset()
        opt.step()
        t = _C.emulated_traffic()
        assert (t["loaded"] / n, t["stored"] / n) == _expected_bytes(param_bytes, state, options, sync)
        # One step kernel and one counter kernel for the bucket.
        assert t["launches"] == 2
        # Per chunk, each thread reads its chunk row, segment row, counters and device
        # scalars once (on a GPU one broadcast per warp), at most 128 bytes; the counter
        # kernel reads a segment row and counters per parameter.
        target = cuda_emulated.EMULATED
        chunks = -(-n // target.chunk_size)
        assert 0 < t["meta_loaded"] <= 128 * target.block * (chunks + 1)
    assert torch.equal(p.grad, grad_before)  # gradients are never written


def test_plain_step_of_a_parameter_without_gradient_touches_nothing() -> None:
    p = torch.randn(1024).requires_grad_()
    q = torch.randn(1024).requires_grad_()
    opt = LookaheadAdam([p, q], lr=0.01, k=3, backend="cuda_emulated")
    p.grad = torch.randn(1024)  # q has none: no inner update, and no sync on a plain step
    _C.emulated_traffic_reset()
    opt.step()
    t = _C.emulated_traffic()
    assert (t["loaded"], t["stored"]) == (1024 * 16, 1024 * 12)


def test_adaptive_alpha_launches_and_traffic() -> None:
    """Adaptive α: pass 1 (inner step + partial sums), one finalize launch, pass 2 (sync),
    then the counters. On a plain step pass 2 reads nothing per element."""
    n = 2048
    p = torch.randn(n).requires_grad_()
    opt = LookaheadAdam([p], lr=0.01, k=2, adaptive_alpha=True, backend="cuda_emulated")
    p.grad = torch.randn(n)
    for sync in (False, True):
        _C.emulated_traffic_reset()
        opt.step()
        t = _C.emulated_traffic()
        assert t["launches"] == 4
        loaded, stored = _expected_bytes(4, ("m", "v"), {}, False)
        if sync:  # pass 1 reads φ for the dot products; pass 2 reads θ and φ, writes both
            loaded, stored = loaded + 4 + 8, stored + 8
        assert (t["loaded"] / n, t["stored"] / n) == (loaded, stored)


# ---------------------------------------------------------------------------------------
# Agreement with the reference on layouts the generic matrix does not reach.
# ---------------------------------------------------------------------------------------


def _reference_run(kind, params, grads_per_step, hyper):
    group = {"inner_state": "maintain", "maximize": False, "weight_decay": 0.0, **hyper}
    ps = [p.detach().clone() for p in params]
    options = {key: group[key] for key in ("momentum", "amsgrad", "inner_state") if key in group}
    states = [reference.init_state(p, optimizer=kind, **options) for p in ps]
    for grads in grads_per_step:
        reference.step_group(kind, ps, grads, states, group)
    return ps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("kind", "hyper"),
    [
        ("adam", {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": True, "inner_state": "pullback"}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "inner_state": "reset"}),
    ],
)
def test_misaligned_views_odd_sizes_and_many_chunks(kind, hyper, dtype) -> None:
    """Parameters that are views at odd storage offsets (scalar path), odd sizes (vector
    body and scalar tail), and one spanning many chunks (more chunks than blocks: the
    grid-stride loop), against the reference."""
    torch.manual_seed(0)
    base = torch.randn(2000, dtype=dtype)
    params = [
        base[1:998].detach().clone().requires_grad_(),  # own storage, odd size
        torch.randn(3 * cuda_emulated.EMULATED.chunk_size * 4 + 5, dtype=dtype).requires_grad_(),
        torch.randn(7, 9, dtype=dtype).requires_grad_(),
    ]
    storage = torch.randn(1001, dtype=dtype)
    params.append(storage[1:].view(40, 25).requires_grad_())  # data pointer 2-4 bytes off alignment
    hyper = {"k": 2, "alpha": 0.5, "weight_decay": 0.0, "maximize": False, **hyper}
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(5)]
    want = _reference_run(kind, params, grads_per_step, hyper)
    opt = CLASSES[kind](params, backend="cuda_emulated", **hyper)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, **TOLERANCES[dtype])


def test_reset_sync_without_gradients_checks_the_second_moments_alignment() -> None:
    """A sync step where no parameter has a gradient walks the sync alone, yet under
    inner_state="reset" it zeroes Adam's v and vmax: with those buffers 4 bytes off alignment
    the walk must take the scalar path (the emulation faults on a misaligned 16-byte store)."""

    def run(misalign: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        params = [torch.randn(64, requires_grad=True), torch.randn(9, 7, requires_grad=True)]
        opt = LookaheadAdam(params, lr=0.01, amsgrad=True, inner_state="reset", k=2, backend="cuda_emulated")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        (bucket,) = _buckets(opt)
        if misalign:
            for key in ("exp_avg_sq", "max_exp_avg_sq"):
                view = torch.zeros(bucket.flat[key].numel() + 1)[1:]
                assert view.data_ptr() % 16 != 0
                bucket.flat[key] = view.copy_(bucket.flat[key])
        for p in params:
            p.grad = None
        opt.step()  # the sync, no gradient: the sync-only walk, with the reset
        return [p.detach().clone() for p in params], [bucket.flat[k] for k in ("exp_avg_sq", "max_exp_avg_sq")]

    want, _ = run(misalign=False)
    got, moments = run(misalign=True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    for m in moments:
        assert m.abs().sum() == 0  # reset


def test_chunk_table_covers_every_element_once() -> None:
    params = [torch.randn(n).requires_grad_() for n in (1, 255, 256, 257, 1000)]
    opt = LookaheadSGD(params, lr=0.1, backend="cuda_emulated")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    (b,) = _buckets(opt)
    chunks = b.backend_cache["cuda_chunks"]
    size = b.backend_cache["cuda_chunk_size"]
    assert size == cuda_emulated.EMULATED.chunk_size  # the emulation's chunks are fixed (no min_chunk)
    covered = torch.zeros(b.numel, dtype=torch.int64)
    for seg, start in chunks.tolist():
        lo = b.offsets[seg] + start
        covered[lo : lo + min(size, params[seg].numel() - start)] += 1
    want = torch.zeros_like(covered)  # every parameter's elements once; the padding between them never
    for p, offset in zip(params, b.offsets):
        want[offset : offset + p.numel()] = 1
    assert torch.equal(covered, want)
    assert b.backend_cache["cuda_grid"] == min(len(chunks), 3)


# ---------------------------------------------------------------------------------------
# Tables are cached; a step needs no host synchronisation.
# ---------------------------------------------------------------------------------------


def test_tables_built_once_and_grad_columns_follow_new_grads() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = LookaheadAdam(model.parameters(), lr=0.01, k=2, backend="cuda_emulated")
    want = LookaheadAdam([p.detach().clone().requires_grad_() for p in model.parameters()], lr=0.01, k=2,
                         backend="eager")  # fmt: skip
    for _ in range(4):
        model.zero_grad(set_to_none=True)  # new gradient tensors every step
        model(torch.randn(4, 6)).square().sum().backward()
        for p, q in zip(model.parameters(), want.param_groups[0]["params"]):
            q.grad = p.grad.clone()
        opt.step()
        want.step()
    assert sum(b.backend_cache["cuda_builds"] for b in _buckets(opt)) == 1
    for p, q in zip(model.parameters(), want.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("adaptive", [False, True])
def test_capturable_scaled_step_without_host_sync(adaptive) -> None:
    """Once the tables exist, a step with GradScaler's tensors and a tensor lr reads nothing
    back and copies nothing to the device: what a CUDA graph capture requires."""
    params = [torch.randn(300).requires_grad_(), torch.randn(5, 7).requires_grad_()]
    opt = LookaheadAdam(params, lr=torch.tensor(0.01), k=2, capturable=True, adaptive_alpha=adaptive,
                        backend="cuda_emulated")  # fmt: skip
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    # GradScaler hands its tensors to optimizers that support amp scaling as attributes.
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt.step()  # builds the tables
    with no_host_sync():
        for _ in range(3):
            opt.step()
    assert all(b.flat["lookahead_step"][0].item() == 4 for b in _buckets(opt))


def test_found_inf_step_changes_nothing_not_even_counters() -> None:
    p = torch.randn(100).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, momentum=0.9, k=1, backend="cuda_emulated")
    p.grad = torch.full_like(p, float("inf"))
    before = p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    (b,) = _buckets(opt)
    assert torch.equal(p.detach(), before)
    assert b.flat["step"].item() == 0 and b.flat["lookahead_step"].item() == 0
    assert torch.equal(b.flat["slow_weights"], before)


def test_adaptive_alpha_is_deterministic() -> None:
    def run() -> list[torch.Tensor]:
        torch.manual_seed(1)
        params = [torch.randn(n).requires_grad_() for n in (700, 33, 1500)]
        opt = LookaheadAdam(params, lr=0.01, k=2, adaptive_alpha=True, alpha_low=0.1, backend="cuda_emulated")
        for _ in range(6):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in params]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _tree_sum(values: list[float], threads: int = 256) -> float:
    """finalize_kernel's order: thread t sums values t, t + threads, ... in order; then a tree
    in shared memory, width halving from threads / 2."""
    s = [0.0] * threads
    for i, v in enumerate(values):
        s[i % threads] += v
    width = threads // 2
    while width:
        for t in range(width):
            s[t] += s[t + width]
        width //= 2
    return s[0]


@pytest.mark.parametrize("pairs", [0, 1, 3, 255, 256, 257, 1000, 4099])
def test_finalize_alpha_is_a_fixed_block_reduction(pairs) -> None:
    """Stage two of adaptive α sums the pairs in one block of 256 threads in a fixed order:
    the same bits as a Python model of that order, whatever the block scheduling (the emulation
    runs the block's threads concurrently), and close to the exact sum."""
    gen = torch.Generator().manual_seed(pairs)
    partials = torch.randn(pairs, 2, dtype=torch.float64, generator=gen) * torch.logspace(-6, 6, max(pairs, 1),
        dtype=torch.float64)[:pairs, None]  # fmt: skip
    partials[:, 1] = partials[:, 1].abs() + 1.0  # dᵀÂd > 0
    gd_values, dad_values = partials[:, 0].tolist(), partials[:, 1].tolist()
    gd, dad = _tree_sum(gd_values), _tree_sum(dad_values)
    want = 0.5 if dad == 0.0 else min(1.0, max(0.1, 1.0 + gd / dad))
    for seed in (0, 7):
        _C.emulated_set_block_order_seed(seed)
        try:
            out = torch.full((), -1.0, dtype=torch.float64)
            f = _C.FinalizeArgs()
            f.partials = partials.data_ptr() if pairs else out.data_ptr()
            f.num_partials, f.alpha_out, f.alpha, f.alpha_low = pairs, out.data_ptr(), 0.5, 0.1
            _C.emulated_finalize_alpha(f)
        finally:
            _C.emulated_set_block_order_seed(0)
        assert out.item() == want  # bit for bit
    if pairs:
        import math

        exact = 1.0 + math.fsum(gd_values) / math.fsum(dad_values)
        assert abs(min(1.0, max(0.1, exact)) - want) <= 1e-12


# ---------------------------------------------------------------------------------------
# Checks before and at the raw-pointer boundary.
# ---------------------------------------------------------------------------------------


def test_bad_launch_shapes_are_rejected() -> None:
    a = _C.LaunchArgs()
    a.num_segments = 0
    a.block = 300  # not a power of two
    with pytest.raises(ValueError, match="power of two"):
        _C.emulated_step(a)
    a.block, a.num_segments = 32, 2  # rows promised, no table
    with pytest.raises(ValueError, match="null segment table"):
        _C.emulated_step(a)


def test_grad_scale_of_another_dtype_is_rejected() -> None:
    p = torch.randn(10).requires_grad_()
    opt = LookaheadSGD([p], lr=0.1, backend="cuda_emulated")
    p.grad = torch.randn(10)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element float32"):
        opt.step()


def test_float64_group_falls_back_to_foreach() -> None:
    p = torch.randn(10, dtype=torch.float64).requires_grad_()
    opt = LookaheadAdam([p], lr=0.1, backend="cuda_emulated")
    p.grad = torch.randn_like(p)
    opt.step()
    assert "cuda_builds" not in _buckets(opt)[0].backend_cache


# ---------------------------------------------------------------------------------------
# Availability of "cuda" on this machine, and what "auto" picks.
# ---------------------------------------------------------------------------------------


def test_cuda_is_unavailable_on_cpu_tensors() -> None:
    assert "CUDA tensors" in backends.unavailable("cuda", CPU)
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        LookaheadSGD([torch.zeros(2, requires_grad=True)], lr=0.1, backend="cuda")


def test_cuda_reason_on_a_cuda_device_is_truthful() -> None:
    why = backends.unavailable("cuda", torch.device("cuda", 0))
    if not _C.build_info()["cuda"]:
        assert why is not None and "built without CUDA" in why
    elif not torch.cuda.is_available():
        assert why is not None and "no CUDA device" in why
    else:  # a GPU: usable, or the runtime says why not (e.g. no kernel for its architecture)
        assert why is None or "sm_" in why or "CUDA" in why
    assert (backends.resolve("auto", {torch.device("cuda", 0)}) == "cuda") == (why is None)


@pytest.mark.skipif(not hasattr(_C, "cuda_kernel_unavailable"), reason="_C was built without CUDA")
def test_cuda_runtime_error_without_a_usable_gpu_is_a_message() -> None:
    """With no GPU (or a driver older than the static runtime) the probe returns the CUDA
    runtime's reason instead of crashing."""
    why = _C.cuda_kernel_unavailable(0)
    if torch.cuda.is_available():
        assert why == "" or "sm_" in why
    else:
        assert "cudaGetDeviceCount" in why or "no CUDA device" in why


@pytest.mark.gpu
@pytest.mark.skipif(backends.unavailable("cuda", torch.device("cuda", 0)) is not None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference_on_the_gpu(dtype) -> None:
    """On a machine with a GPU: the real kernels against the reference, every variant, with
    and without GradScaler (what `python -m lookahead_fused check --device cuda` runs)."""
    failures = []
    for variant in variants():
        for scaler in (False, True):
            report = run_against_reference("cuda", variant, dtype, "cuda", grad_scaler=scaler)
            failures += [f"{variant.name} scaler={scaler}: {f}" for f in report.failures]
    assert not failures, "\n".join(failures[:20])


def test_a_cpu_lr_tensor_beside_gpu_parameters_is_read_on_the_host() -> None:
    """backends._compiled.host_lr, as cuda and triton call it: a CPU tensor lr for parameters
    on a GPU is read on the host (a copy from pageable memory would wait for the GPU every
    step), refused under capture (the graph would keep its value); a tensor on the parameters'
    device is left to the kernel; a float is a float."""
    from lookahead_fused.backends._compiled import host_lr

    gpu = torch.device("cuda", 0)  # only compared, never touched
    lr = torch.tensor(0.125)
    assert host_lr(lr, gpu, capturing=False) == 0.125
    with pytest.raises(RuntimeError, match="lr is a CPU tensor: a CUDA graph would keep its value"):
        host_lr(lr, gpu, capturing=True)
    assert host_lr(lr, CPU, capturing=True) is None  # the kernel reads it where it lives
    assert host_lr(0.5, gpu, capturing=True) == 0.5
