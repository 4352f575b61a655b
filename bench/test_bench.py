"""pytest-benchmark suite on the tiny parameter set, and the benchmark's own machinery.

    pytest bench/ --benchmark-only      # the timings (pytest-benchmark's statistics)
    pytest bench/                       # the same, plus the structural tests

The full comparison (every contender, ResNet-152, interleaved) is `python -m bench`.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lookahead_fused
from lookahead_fused import backends

from . import __main__ as cli
from . import contenders as contenders_module
from .contenders import FAMILY_NAMES, contenders
from .floor import MAX_STREAMS, FloorCycle, passes, triton_stream
from .params import NAMES, gpt2_shapes, param_set, resnet_shapes

CPU = torch.device("cpu")
TINY = param_set("tiny")

# The fused class on the backend "auto" picks here, against torch's fused Adam and SGD.
_FASTEST = backends.resolve("auto", {CPU})
_PICKED = [
    c
    for c in contenders(CPU)
    if c.name in (f"LookaheadAdam(backend={_FASTEST})", f"LookaheadSGD(backend={_FASTEST})") or c.baseline
]


@pytest.mark.parametrize("contender", _PICKED, ids=lambda c: c.name)
def test_step(benchmark, contender) -> None:
    params = TINY.make(CPU)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    before = [p.detach().clone() for p in params]
    opt = contender.build(params)
    benchmark(opt.step)
    # Every step moves every parameter (a constant gradient, no sync lands exactly back).
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.isfinite(p).all() for p in params)


def test_picked_contenders() -> None:
    assert len(_PICKED) == 4, [c.name for c in _PICKED]


@pytest.mark.parametrize("blocks", [(3, 4, 6, 3), (3, 8, 36, 3), (1, 1)])
def test_resnet_shapes_follow_the_architecture(blocks: tuple[int, ...]) -> None:
    shapes = resnet_shapes(blocks, width=16, num_classes=7)
    convs = [s for s in shapes if len(s) == 4]
    # stem + three convs per bottleneck + one downsample conv per stage; each conv has a bn (2 tensors)
    assert len(convs) == 1 + 3 * sum(blocks) + len(blocks)
    assert len(shapes) == 3 * len(convs) + 2
    assert shapes[0] == (16, 3, 7, 7)
    final_channels = 4 * 16 * 2 ** (len(blocks) - 1)
    assert shapes[-2:] == [(7, final_channels), (7,)]
    assert sum(s[2] == 3 for s in convs) == sum(blocks)  # one 3x3 conv per bottleneck
    # each conv reads what the one before it in its path wrote (the downsample reads the block's input)
    assert all(a[0] == b[1] for a, b in zip(convs, convs[1:], strict=False) if b[2] == 3)


@pytest.mark.parametrize(("layers", "width"), [(12, 768), (2, 16)])
def test_gpt2_shapes_follow_the_architecture(layers: int, width: int) -> None:
    vocab, context = 101, 32
    shapes = gpt2_shapes(layers, width, vocab, context)
    assert len(shapes) == 2 + 12 * layers + 2  # embeddings, 12 tensors a layer, ln_f
    assert shapes[:2] == [(vocab, width), (context, width)]
    matrices = [s for s in shapes[2:] if len(s) == 2]
    assert len(matrices) == 4 * layers  # qkv, attention out, MLP in, MLP out
    # 4 w^2 (qkv + out) + 8 w^2 (MLP) of weights a layer; biases 3w + w + 4w + w, norms 4w
    per_layer = 12 * width**2 + 13 * width
    assert sum(torch.Size(s).numel() for s in shapes) == (vocab + context) * width + layers * per_layer + 2 * width


def test_param_sets() -> None:
    for name in NAMES:
        pset = param_set(name)  # the real models assert their original counts when built
        assert pset.numel == sum(torch.Size(s).numel() for s in pset.shapes)
    assert set(param_set("tiny10k").shapes) == {(64,)} and param_set("tiny10k").tensors == 10_000
    params = TINY.make(CPU, torch.bfloat16)
    assert [tuple(p.shape) for p in params] == list(TINY.shapes)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in params)
    with pytest.raises(ValueError, match="Invalid parameter set"):
        param_set("resnet9000")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_floor_streams_the_bytes_of_a_fused_step(family: str, dtype: torch.dtype) -> None:
    n, k = 1000, 5
    (fused,) = [c for c in contenders(CPU, (family,), k) if c.name.endswith("(backend=cpu)")]

    def streamed(sync: bool) -> int:
        return sum((reads + writes) * numel * 4 for reads, writes, numel in passes(n, family, dtype, sync))

    assert (streamed(False) * (k - 1) + streamed(True)) / k / n == pytest.approx(fused.bytes_per_param(dtype))


def _triton_device() -> str:
    """Where the Triton floor kernel can run: a GPU, or CPU tensors under the interpreter
    (as in CI, where test.sh sets TRITON_INTERPRET=1)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton floor kernel needs a GPU or TRITON_INTERPRET=1")
    return "cpu"


@pytest.mark.parametrize("reads", range(1, MAX_STREAMS + 1))
def test_triton_floor_kernel_reads_every_buffer_and_writes_the_first(reads: int) -> None:
    """The GPU floor kernel: with scale 2 and mix 1 each written buffer becomes
    2x + Σ(all read), so every load and every store is observable."""
    device, n = _triton_device(), 3000  # two blocks, the second partial
    for writes in range(reads + 1):
        buffers = [torch.randn(n, device=device) for _ in range(reads)]
        before = [b.clone() for b in buffers]
        triton_stream(buffers, writes, scale=2.0, mix=1.0)
        total = sum(before)
        for i, (got, was) in enumerate(zip(buffers, before)):
            want = 2 * was + total if i < writes else was
            torch.testing.assert_close(got, want, msg=f"buffer {i} of {reads}, {writes} written")


def test_triton_floor_cycle_streams_the_sync_pass_every_k_steps() -> None:
    cycle = FloorCycle(1000, "adam", k=2, lookahead=True, device=_triton_device(), use_triton=True)
    slow = cycle.buffers[0][4].clone()  # φ: read and written on sync steps only (scale 1, mix 0)
    cycle.step()
    assert [len(b) for b in cycle.buffers] == [5] and torch.equal(cycle.buffers[0][4], slow)
    cycle.step()
    assert torch.equal(cycle.buffers[0][4], slow)  # written back unchanged, but streamed
    with pytest.raises(ValueError, match="1 to 5 buffers"):
        triton_stream([torch.zeros(4)] * 6, 1)


def test_bytes_per_param_by_dtype() -> None:
    adam = {c.name: c for c in contenders(CPU, ("adam",), k=10)}
    # bf16 θ and g (2 B), fp32 m v φ for the fused class; torch keeps m v in the parameters' dtype
    assert adam["LookaheadAdam(backend=cpu)"].bytes_per_param(torch.bfloat16) == pytest.approx(3 * 2 + 4 * 4 + 8 / 10)
    assert adam["torch Adam(fused=True)"].bytes_per_param(torch.bfloat16) == 7 * 2
    with pytest.raises(ValueError, match="Invalid k"):
        contenders(CPU, ("adam",), k=0)


def test_state_bytes_count_each_storage_once() -> None:
    params, grads = TINY.make(CPU), TINY.make(CPU, requires_grad=False)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    fused = lookahead_fused.LookaheadAdam(params, backend="cpu")
    fused.step()
    n = TINY.numel
    # m, v, φ in fp32 and a few counters a tensor: views of flat buffers, not a buffer per view
    assert 12 * n <= cli._state_bytes(fused, params, grads) <= 12 * n + 64 * TINY.tensors
    wrapped = lookahead_fused.Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    wrapped.step()  # momentum buffers in the inner optimizer, slow weights in the wrapper
    assert 8 * n <= cli._state_bytes(wrapped, params, grads) <= 8 * n + 64 * TINY.tensors


def test_launches_count_calls_into_the_kernels() -> None:
    def opt(backend: str) -> torch.optim.Optimizer:
        params = TINY.make(CPU)
        for p in params:
            p.grad = torch.ones_like(p)
        return lookahead_fused.LookaheadSGD(params, lr=0.1, momentum=0.9, k=3, backend=backend)

    assert cli._launches_per_step(opt("cpu"), 3, CPU) == 1  # one pass per bucket and step, sync included
    assert cli._launches_per_step(opt("eager"), 3, CPU) is None  # torch ops only: nothing of _C


@pytest.mark.parametrize("backend", ["cpu", "cuda_emulated", "triton"])
def test_host_time_steps_with_the_kernels_stubbed(backend: str) -> None:
    """Under _stubbed_kernels a compiled backend's step runs every host-side check and table
    but no kernel (the parameters and the state stay as they are), and the kernels are back
    afterwards; the host-ms column is measured for the fused classes only."""
    params = TINY.make(CPU)
    for p in params:
        p.grad = torch.ones_like(p)
    opt = lookahead_fused.LookaheadAdam(params, lr=0.1, k=2, alpha=0.7, backend=backend)
    opt.step()  # builds the buckets and tables with the real kernels
    before = [p.detach().clone() for p in params]
    seconds = cli._host_seconds(opt, 2, CPU, cycles=2)
    assert seconds is not None and 0 < seconds < 1
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # nothing ran
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))  # restored
    assert cli._host_seconds(torch.optim.Adam(params), 2, CPU) is None
    assert cli._host_seconds(lookahead_fused.LookaheadAdam(params, backend="foreach"), 2, CPU) is None


def test_timm_lookahead_loads_without_the_package_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's __init__ may fail (torchvision absent); its lookahead.py alone then still loads."""
    (tmp_path / "timm" / "optim").mkdir(parents=True)
    (tmp_path / "timm" / "__init__.py").write_text("import no_such_torchvision_here\n")
    (tmp_path / "timm" / "optim" / "__init__.py").write_text("")
    (tmp_path / "timm" / "optim" / "lookahead.py").write_text(
        textwrap.dedent("""
            import torch

            class Lookahead(torch.optim.Optimizer):
                origin = "file"
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    cls, why = contenders_module._timm_lookahead()
    assert why is None and cls.origin == "file"
    (tmp_path / "timm" / "optim" / "lookahead.py").unlink()
    cls, why = contenders_module._timm_lookahead()
    assert cls is None and "timm not importable" in why


def test_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    row = {"name": "x", "set": "resnet152", "family": "adam", "dtype": "fp32", "k": 5, "lookahead": True}
    rows = [
        dict(row, median_ms=2.0, min_ms=1.0, max_ms=3.0),
        dict(row, name="y", median_ms=1.0, min_ms=1.0, max_ms=1.0),
    ]
    out = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not cli.plot(rows, str(out)) and "matplotlib is not installed" in capsys.readouterr().out
    else:
        assert cli.plot(rows, str(out)) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not cli.plot(rows, str(out), set_name="gpt2")  # nothing of that set timed
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert not cli.plot(rows, str(tmp_path / "none.png"))
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("argv", [["--k", "0"], ["--reps", "0"], ["--dtype", "fp8"], ["--family", "lamb"]])
def test_cli_refuses_bad_settings(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cpu", "--quick", *argv])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("family", ["adam", "sgd"])
def test_short_run_keeps_ours_the_wrapper_torch_fused_and_the_floor(family: str) -> None:
    """`python -m bench --short` (what `bash run.sh` runs) measures four contenders a family,
    so that it fits in about a minute and under 3 GB on a CPU."""
    kept = [c for c in contenders(CPU, (family,)) if cli._in_short_run(c, CPU)]
    names = [c.name for c in kept]
    assert len(kept) == 4, names
    assert sum(c.baseline for c in kept) == 1 and sum(c.floor for c in kept) == 1
    assert any(n.endswith(f"(backend={_FASTEST})") for n in names), names


def test_interrupted_run_keeps_the_families_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A time limit that stops `python -m bench` with SIGINT (bench/gpu_report.sh's timeout)
    leaves the JSON of every family measured before it, marked incomplete, and exit status 130."""
    measured = []
    real_measure = cli.measure

    def measure(entries, *args, **kwargs):
        if measured:  # the second family: the limit strikes
            raise KeyboardInterrupt
        measured.append(entries[0].family.name)
        return real_measure(entries, *args, **kwargs)

    monkeypatch.setattr(cli, "measure", measure)
    out = tmp_path / "bench.json"
    assert cli.main(["--device", "cpu", "--quick", "--family", "adam", "--family", "sgd", "--json", str(out)]) == 130
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert measured == ["adam"] and report["results"]
    assert {r["family"] for r in report["results"]} == {"adam"}
    assert not (tmp_path / "bench.json.tmp").exists()

    monkeypatch.setattr(cli, "measure", real_measure)
    assert cli.main(["--device", "cpu", "--quick", "--family", "sgd", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] is True
