"""`python -m bench`: the time of one optimizer step, Lookahead fused or not, per contender.

    python -m bench [--set NAME ...] [--family adam|adamw|sgd ...] [--k K ...]
                    [--dtype fp32|bf16 ...] [--full] [--reps N] [--device cpu|cuda]
                    [--quick] [--json out.json] [--plot out.png]

The default run is ResNet-152, fp32, k=5, Adam and SGD; `--full` runs every set, family,
dtype and k (5 and 10). How it measures, so that the numbers mean the same on every machine:
- every contender has its own parameters (the shapes of the set, in the dtype) and state;
  the gradients are set once and shared by the contenders of a family (none writes them);
- a measurement is one Lookahead cycle, k consecutive steps, each timed (perf_counter on
  the CPU, CUDA events on a GPU): "ms/step" is the cycle's time / k, the sync step amortised
  as a user sees it, and "sync ms" the k-th step alone; one cycle before the first
  measurement allocates the state and warms caches, one more counts the launches;
- contenders are measured round-robin, one cycle each per repetition, with the starting
  contender rotated, so drift in the machine (clocks, other load) hits all alike;
- the table shows the median over repetitions and the min-max; GB/s is the minimum traffic
  (Contender.bytes_per_param) over the median time, so the fastest possible kernel on a
  machine sits at that machine's memory bandwidth;
- "floor ms": a streaming kernel with the same bytes (bench/floor.py: `_C` on the CPU,
  Triton on a GPU), measured in the same run; "of floor" is floor / measured, for the rows
  with those bytes. On a GPU whose bandwidth is modelled (MODELLED_BANDWIDTH: H100) the rows
  also give "of model", the modelled floor (bytes / bandwidth) over the measured time;
- "launches": calls into the compiled kernels per step (CPU: calls of `_C`, counted by
  wrapping it; GPU: device kernels and copies in the profiler); "extra MiB": the memory the
  optimizer holds beyond parameters and gradients (CPU: its state tensors, each storage
  once; GPU: the peak of allocated memory over building it and one cycle);
- "host ms": for the fused classes on a compiled backend, a step with the kernels replaced by
  calls that do nothing (the fastest of 5 cycles, after the timed repetitions): what the host
  spends per step on checks, tables and launch arguments. On a GPU this is the step's time
  whenever it exceeds the kernels' (a CUDA graph replay removes it);
- on a GPU each capturable contender is also timed with its step captured in a CUDA graph
  and replayed ("graph ms/step").
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lookahead_fused.check import default_device, machine_info

from .contenders import FAMILIES, FAMILY_NAMES, KS, Contender, contenders
from .params import NAMES as SET_NAMES
from .params import ParamSet, param_set

# Repetitions: a ResNet-152 step takes 30-500 ms on a CPU and about a millisecond on a GPU.
DEFAULT_REPS = {"cpu": 5, "cuda": 20}
QUICK_REPS = 2
SHORT_REPS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Modelled memory bandwidth by GPU name (a substring of torch.cuda.get_device_name()).
MODELLED_BANDWIDTH = {"H100": 3.0e12}
MODES = ("eager", "graph")  # plain steps; the step captured in a CUDA graph and replayed (GPU only)


@dataclass
class Result:
    contender: Contender
    # per mode, one entry per repetition: seconds per step over a cycle, and of the sync step
    seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    sync_seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    launches: float | None = None
    host_seconds: float | None = None  # per step, kernels stubbed (_host_seconds)
    extra_bytes: int | None = None
    unavailable: str | None = None
    error: str | None = None
    graph_unavailable: str | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cycle(step: Callable[[], Any], k: int, device: torch.device) -> list[float]:
    """Seconds of each of the k steps of one Lookahead cycle."""
    _synchronize(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(k + 1)]
        events[0].record()
        for event in events[1:]:
            step()
            event.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]
    stamps = [time.perf_counter()]
    for _ in range(k):
        step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


class _CountingModule:
    """Stands in for a module: its callables count their calls."""

    def __init__(self, module: Any) -> None:
        self._module, self.calls = module, 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if not callable(value) or isinstance(value, type):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return value(*args, **kwargs)

        return counted


@contextlib.contextmanager
def _counting_c_calls() -> Iterator[list[_CountingModule]]:
    """The `_C` of the cpu backend and of the floor kernel, counting calls (CPU launches)."""
    import lookahead_fused.backends.cpu as cpu_backend

    from . import floor

    owners = [m for m in (cpu_backend, floor) if getattr(m, "_C", None) is not None]
    originals = [m._C for m in owners]
    counters = [_CountingModule(c) for c in originals]
    for owner, counter in zip(owners, counters, strict=True):
        owner._C = counter
    try:
        yield counters
    finally:
        for owner, original in zip(owners, originals, strict=True):
            owner._C = original


def _launches_per_step(opt: Optimizer, k: int, device: torch.device) -> float | None:
    """Kernel launches per step over one cycle; None where nothing countable launches."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _time_cycle(opt.step, k, device)
        launches = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    else:
        with _counting_c_calls() as counters:
            _time_cycle(opt.step, k, device)
        launches = sum(c.calls for c in counters)
    return launches / k if launches else None


class _Stub:
    """Stands in for a module: the named callables do nothing (and return `value`)."""

    def __init__(self, module: Any, names: dict[str, Any]) -> None:
        self._module, self._names = module, names

    def __getattr__(self, name: str) -> Any:
        if name in self._names:
            value = self._names[name]
            return lambda *args, **kwargs: value
        return getattr(self._module, name)


class _StubKernel:
    """Stands in for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _stubbed_kernels() -> Iterator[None]:
    """The compiled backends with their kernels replaced by calls that do nothing: a step
    then costs what the host spends on it (checks, tables, launch arguments)."""
    import lookahead_fused.backends.cpu as cpu_backend
    import lookahead_fused.backends.cuda as cuda_backend
    import lookahead_fused.backends.triton as triton_backend

    patches: list[tuple[Any, str, Any]] = []
    if cpu_backend._C is not None:
        patches.append((cpu_backend, "_C", _Stub(cpu_backend._C, {"lookahead_step": (0.0, 0.0)})))
    if cuda_backend._C is not None:  # cuda and cuda_emulated reach their entry points through it
        entries = {f"{prefix}{what}": None for prefix in ("cuda_", "emulated_") for what in ("step", "finalize_alpha")}
        patches.append((cuda_backend, "_C", _Stub(cuda_backend._C, entries)))
    if triton_backend.kernels is not None:
        names = ("lookahead_step_kernel", "advance_counters_kernel")
        patches += [(triton_backend.kernels, name, _StubKernel()) for name in names]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, stub in patches:
            setattr(owner, name, stub)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


# The backends whose kernels _stubbed_kernels replaces: the host time of the others (torch's
# optimizers, foreach, eager) cannot be told apart from their kernels'.
HOST_TIMED_BACKENDS = ("cpu", "cuda", "cuda_emulated", "triton")


def _host_seconds(opt: Optimizer, k: int, device: torch.device, cycles: int = 5) -> float | None:
    """Seconds of host time per step (the fastest of `cycles` cycles, kernels stubbed), for
    the fused classes on a compiled backend; None for the others. Run after the timed
    repetitions: the stubbed steps change nothing but the host's counters."""
    if getattr(opt, "backend", None) not in HOST_TIMED_BACKENDS:
        return None
    _synchronize(device)
    best = math.inf
    with _stubbed_kernels():
        for _ in range(cycles):
            start = time.perf_counter()
            for _ in range(k):
                opt.step()
            best = min(best, (time.perf_counter() - start) / k)
    _synchronize(device)
    return best


def _tensors(obj: Any, seen: set[int]) -> Iterator[Tensor]:
    """Every tensor an optimizer holds in its state, that of inner optimizers included."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Optimizer):
        for name, value in vars(obj).items():
            if name != "param_groups":  # the parameters themselves
                yield from _tensors(value, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value, seen)


def _state_bytes(opt: Optimizer, params: list[Tensor], grads: list[Tensor]) -> int:
    """Bytes of the optimizer's tensors beyond parameters and gradients. The fused classes'
    state entries are views of flat buffers: each storage counts once."""
    exclude = {t.untyped_storage().data_ptr() for t in params + grads}
    storages = {}
    for t in _tensors(opt, set()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _prepare(
    result: Result, pset: ParamSet, grads: list[Tensor], dtype: torch.dtype, device: torch.device
) -> Optimizer:
    contender = result.contender
    params = pset.make(device, dtype)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    opt = contender.build(params)
    _time_cycle(opt.step, contender.k, device)  # warm-up: state allocation, first-touch page faults, lazy init
    if not contender.floor:
        if device.type == "cuda":
            result.extra_bytes = torch.cuda.max_memory_allocated(device) - before
        else:
            result.extra_bytes = _state_bytes(opt, params, grads)
    result.launches = _launches_per_step(opt, contender.k, device)  # a whole cycle: steps stay aligned
    return opt


def _graphed(
    contender: Contender, pset: ParamSet, grads: list[Tensor], dtype: torch.dtype, device: torch.device
) -> Callable[[], None]:
    """One step of a capturable build of the contender, captured in a CUDA graph: the replay."""
    params = pset.make(device, dtype)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt = contender.graph_build(params)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture, on a side stream as capture requires
        for _ in range(contender.k):  # a whole cycle: the first replay starts a cycle
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def measure(
    entries: list[Contender], pset: ParamSet, dtype: torch.dtype, device: torch.device, reps: int
) -> list[Result]:
    """Times every available contender (all of one family) interleaved round-robin."""
    results = [Result(c, unavailable=c.unavailable) for c in entries]
    grads = pset.make(device, dtype, requires_grad=False)
    for g in grads:
        g.mul_(1e-2)  # gradient-sized values keep Adam's and SGD's updates small over many steps
    live: list[tuple[Result, str, Callable[[], Any]]] = []
    optimizers: list[tuple[Result, Optimizer]] = []
    for result in results:
        c = result.contender
        if c.build is None:
            continue
        try:
            opt = _prepare(result, pset, grads, dtype, device)
            live.append((result, "eager", opt.step))
            optimizers.append((result, opt))
        except NotImplementedError as e:  # a contender still being written
            result.unavailable = f"not implemented yet{': ' + str(e) if str(e) else ''}"
            continue
        except Exception as e:  # one broken contender must not hide the others' numbers
            result.error = f"{type(e).__name__}: {e}"
            continue
        if device.type != "cuda":
            result.graph_unavailable = "CUDA graphs need a GPU"
        elif c.graph_build is None:
            result.graph_unavailable = "not capturable"
        else:
            try:
                live.append((result, "graph", _graphed(c, pset, grads, dtype, device)))
            except Exception as e:  # capture refused: the eager numbers still stand
                result.graph_unavailable = f"capture failed: {type(e).__name__}: {e}"
    for rep in range(reps):
        shift = rep % len(live) if live else 0
        for result, mode, step in live[shift:] + live[:shift]:
            steps = _time_cycle(step, result.contender.k, device)
            result.seconds[mode].append(sum(steps) / len(steps))
            result.sync_seconds[mode].append(steps[-1])
    for result, opt in optimizers:
        result.host_seconds = _host_seconds(opt, result.contender.k, device)
    return results


def modelled_bandwidth(device: torch.device) -> float | None:
    """Bytes per second of the GPU's memory as modelled for the floor; None when not modelled."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in MODELLED_BANDWIDTH.items() if key in name), None)


def _row(
    result: Result,
    pset: ParamSet,
    dtype: str,
    baseline: float | None,
    floor: Result | None,
    bandwidth: float | None,
) -> dict[str, Any]:
    c = result.contender
    bytes_per_param = c.bytes_per_param(DTYPES[dtype])
    row: dict[str, Any] = {
        "name": c.name,
        "set": pset.name,
        "dtype": dtype,
        "k": c.k,
        "family": c.family.name,
        "lookahead": c.lookahead,
        "bytes_per_param": bytes_per_param,
        "unavailable": result.unavailable,
        "error": result.error,
    }
    times = result.seconds["eager"]
    if not times:
        return row
    median = statistics.median(times)
    if floor and floor.seconds["eager"] and floor.contender.bytes_per_param(DTYPES[dtype]) == bytes_per_param:
        floor_s = statistics.median(floor.seconds["eager"])  # measured, for the rows with its bytes
    else:
        floor_s = None
    modelled_s = bytes_per_param * pset.numel / bandwidth if bandwidth else None  # this row's own bytes
    graph = result.seconds["graph"]
    row.update(
        times_ms=[s * 1e3 for s in times],
        median_ms=median * 1e3,
        min_ms=min(times) * 1e3,
        max_ms=max(times) * 1e3,
        sync_ms=statistics.median(result.sync_seconds["eager"]) * 1e3 if c.lookahead else None,
        gb_per_s=bytes_per_param * pset.numel / median / 1e9,
        vs_torch_fused=median / baseline if baseline else None,
        floor_ms=floor_s * 1e3 if floor_s and not c.floor else None,
        of_floor=floor_s / median if floor_s and not c.floor else None,
        modelled_floor_ms=modelled_s * 1e3 if modelled_s else None,
        of_modelled_floor=modelled_s / median if modelled_s else None,
        launches_per_step=result.launches,
        host_ms=result.host_seconds * 1e3 if result.host_seconds is not None else None,
        extra_mib=result.extra_bytes / 2**20 if result.extra_bytes is not None else None,
        graph_median_ms=statistics.median(graph) * 1e3 if graph else None,
        graph_min_ms=min(graph) * 1e3 if graph else None,
        graph_max_ms=max(graph) * 1e3 if graph else None,
        graph_sync_ms=statistics.median(result.sync_seconds["graph"]) * 1e3 if graph and c.lookahead else None,
        graph_unavailable=result.graph_unavailable,
    )
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_table(rows: list[dict[str, Any]], gpu: bool) -> None:
    columns = f"{'ms/step':>8} {'min-max':<15}{'sync ms':>8} {'GB/s':>6} {'x fused':>7} {'floor ms':>8} {'of floor':>8}"
    columns += f" {'launch':>6} {'host ms':>7} {'extra MiB':>9}"
    columns += f" {'graph ms/step':>13} {'of model':>8}" if gpu else ""
    print(f"{'contender':<42} {columns}")
    configs = dict.fromkeys((r["set"], r["dtype"], r["k"], r["family"]) for r in rows)
    names = {f.name: f.torch_class.__name__ for f in FAMILIES}
    for pset, dtype, k, family in configs:
        print(f"{names[family]}, {pset}, {dtype}, k={k}:")
        for r in rows:
            if (r["set"], r["dtype"], r["k"], r["family"]) != (pset, dtype, k, family):
                continue
            if "median_ms" not in r:
                why = "error: " + r["error"] if r["error"] else "unavailable: " + r["unavailable"]
                print(f"  {r['name']:<40} {why}")
                continue
            line = (
                f"{r['median_ms']:>8.2f} {r['min_ms']:.2f}-{r['max_ms']:.2f}".ljust(24)
                + f"{_fmt(r['sync_ms'], '.2f'):>8} {r['gb_per_s']:>6.1f} {_fmt(r['vs_torch_fused'], '.2f'):>7}"
                f" {_fmt(r['floor_ms'], '.2f'):>8} {_fmt(r['of_floor'], '.0%'):>8}"
                f" {_fmt(r['launches_per_step'], '.3g'):>6} {_fmt(r['host_ms'], '.3f'):>7}"
                f" {_fmt(r['extra_mib'], '.1f'):>9}"
            )
            if gpu:
                line += f" {_fmt(r['graph_median_ms'], '.3f'):>13} {_fmt(r['of_modelled_floor'], '.0%'):>8}"
            print(f"  {r['name']:<40} {line}")


def plot(rows: list[dict[str, Any]], path: str, set_name: str = "resnet152") -> bool:
    """A horizontal bar per timed contender (median ms/step, min-max whiskers), one panel per
    family/dtype/k of the set. False (and why, printed) when matplotlib or the set is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"--plot: matplotlib is not installed ({e}); no plot written")
        return False
    timed = [r for r in rows if r["set"] == set_name and "median_ms" in r]
    configs = list(dict.fromkeys((r["family"], r["dtype"], r["k"]) for r in timed))
    if not configs:
        print(f"--plot: no timed rows of the {set_name} set; no plot written")
        return False
    heights = [sum((r["family"], r["dtype"], r["k"]) == c for r in timed) for c in configs]
    fig, axes = plt.subplots(
        len(configs), 1, figsize=(10, 1.2 + 0.4 * sum(heights) + 0.6 * len(configs)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    for ax, (family, dtype, k) in zip(axes[:, 0], configs, strict=True):
        panel = [r for r in timed if (r["family"], r["dtype"], r["k"]) == (family, dtype, k)]
        y = range(len(panel))
        medians = [r["median_ms"] for r in panel]
        spread = [
            [m - r["min_ms"] for m, r in zip(medians, panel, strict=True)],
            [r["max_ms"] - m for m, r in zip(medians, panel, strict=True)],
        ]
        colors = [
            "tab:gray" if r["name"].startswith("floor") else "tab:blue" if r["lookahead"] else "tab:orange"
            for r in panel
        ]
        ax.barh(y, medians, xerr=spread, color=colors, capsize=3)
        ax.set_yticks(list(y), [r["name"] for r in panel], fontsize=8)
        ax.invert_yaxis()
        for i, r in zip(y, panel, strict=True):  # the value right of the whisker, not over it
            ax.text(r["max_ms"], i, f"  {r['median_ms']:.3g}", va="center", fontsize=7)
        ax.set_title(f"{family}, {set_name}, {dtype}, k={k}", fontsize=9)
        ax.set_xlabel(
            "ms per step (median, min-max whiskers); blue: Lookahead, orange: torch alone, gray: floor", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set", choices=SET_NAMES, action="append", help="parameter set (default resnet152; tiny with --quick)"
    )
    parser.add_argument("--family", choices=FAMILY_NAMES, action="append", help="default: adam and sgd")
    parser.add_argument("--k", type=int, action="append", help=f"Lookahead's k (default {KS[0]})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="parameter dtype (default fp32)")
    parser.add_argument("--full", action="store_true", help=f"every set but tiny, family, dtype, and k in {KS}")
    reps_help = ", ".join(f"{n} on {d}" for d, n in DEFAULT_REPS.items())
    parser.add_argument("--reps", type=int, help=f"repetitions (default {reps_help}; {QUICK_REPS} with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny set and few repetitions: a smoke test")
    parser.add_argument(
        "--short",
        action="store_true",
        help=f"ResNet-50, {SHORT_REPS} repetitions, only the fused class on the backend 'auto' picks, the "
        "generic wrapper, torch's fused optimizer and the floor: about a minute and under 3 GB on a CPU "
        "(what `bash run.sh` runs)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the machine, settings and results as JSON")
    parser.add_argument(
        "--plot", metavar="PNG", help="also plot ms/step by contender for the ResNet-152 set (matplotlib)"
    )
    return parser


def _in_short_run(c: Contender, device: torch.device) -> bool:
    """The contenders of --short: ours on the backend "auto" picks, the generic wrapper,
    torch's fused optimizer (the baseline) and the floor."""
    from lookahead_fused import backends

    ours = f"(backend={backends.resolve('auto', {device})})"
    return c.baseline or c.floor or c.name.endswith(ours) or c.name.startswith("lookahead_fused.Lookahead(")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    short_reps = SHORT_REPS if args.short else None
    reps = args.reps if args.reps is not None else QUICK_REPS if args.quick else short_reps or DEFAULT_REPS[device.type]
    if reps < 1:
        parser.error(f"--reps must be at least 1, got {reps}")
    if any(k < 1 for k in args.k or ()):
        parser.error(f"--k must be at least 1, got {args.k}")
    full_sets = tuple(n for n in SET_NAMES if n != "tiny")
    default_set = ("tiny",) if args.quick else ("resnet50",) if args.short else ("resnet152",)
    sets = args.set or (full_sets if args.full else default_set)
    families = tuple(args.family or (FAMILY_NAMES if args.full else ("adam", "sgd")))
    ks = tuple(args.k or (KS if args.full else KS[:1]))
    dtypes = tuple(args.dtype or (tuple(DTYPES) if args.full else ("fp32",)))
    psets = [param_set(name) for name in dict.fromkeys(sets)]

    machine = machine_info()
    gpu = machine["gpus"][device.index or 0]["name"] if device.type == "cuda" else "none"
    bandwidth = modelled_bandwidth(device)
    print(
        "bench: one optimizer step on "
        + "; ".join(f"{p.name} ({p.tensors:,} tensors, {p.numel:,} parameters)" for p in psets)
        + f"; {', '.join(dtypes)}; k={', '.join(map(str, ks))}; {device}"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cpu_count']} cores (load average {machine['load_average']}), "
        f"torch threads {machine['torch_threads']}, "
        f"GPU {gpu}; python {machine['python']}, torch {machine['torch']}, triton {machine['triton'] or '-'}; "
        f"layout checks in {machine['layout_checks']}"
    )
    timer = "CUDA events" if device.type == "cuda" else "perf_counter"
    floor = "floor: stream kernel measured here" + (
        f"; of model: the modelled floor (bytes / {bandwidth / 1e12:.1f} TB/s) over the measured time"
        if bandwidth
        else f" (no modelled bandwidth for {gpu})"
        if device.type == "cuda"
        else ""
    )
    print(
        f"per step: a cycle of k steps timed by {timer} / k (sync ms: the k-th step), contenders interleaved, "
        f"{reps} repetitions; GB/s at minimum traffic (state fp32 for ours, in the parameters' dtype for "
        f"torch.optim); {floor}",
        flush=True,
    )

    def write_json(rows: list[dict[str, Any]], complete: bool) -> None:
        """The figures so far (rewritten after every family, so that a run stopped by a time
        limit keeps what it measured), atomically."""
        report = {
            "machine": machine,
            "device": str(device),
            "gpu": gpu,
            "modelled_bandwidth": bandwidth,
            "sets": {p.name: {"tensors": p.tensors, "params": p.numel} for p in psets},
            "dtypes": list(dtypes),
            "ks": list(ks),
            "families": list(families),
            "repetitions": reps,
            "complete": complete,
            "results": rows,
        }
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)

    rows: list[dict[str, Any]] = []
    interrupted = False
    try:
        for pset, dtype, k, family in itertools.product(psets, dtypes, ks, families):
            entries = contenders(device, (family,), k)
            if args.short:
                entries = [c for c in entries if _in_short_run(c, device)]
            results = measure(entries, pset, DTYPES[dtype], device, reps)
            baseline = next(
                (statistics.median(r.seconds["eager"]) for r in results if r.contender.baseline and r.seconds["eager"]),
                None,
            )
            floor_result = next((r for r in results if r.contender.floor), None)
            rows += [_row(r, pset, dtype, baseline, floor_result, bandwidth) for r in results]
            if args.json:
                write_json(rows, complete=False)
    except KeyboardInterrupt:  # Ctrl-C, or SIGINT from a time limit (bench/gpu_report.sh): keep what was measured
        interrupted = True
        print("bench: interrupted; the table has the families measured so far", file=sys.stderr)
    _print_table(rows, gpu=device.type == "cuda")

    if args.plot and rows:
        plot_set = "resnet152" if any(p.name == "resnet152" for p in psets) else psets[0].name
        if plot(rows, args.plot, plot_set):
            print(f"plot: {args.plot}")
    if args.json:
        write_json(rows, complete=not interrupted)
    if interrupted:
        return 130
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
