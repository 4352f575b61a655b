"""`python -m bench`: the time of one optimizer step, Lookahead fused or not, per contender.

    python -m bench [--set resnet152|resnet50|tiny] [--family adam|sgd] [--reps N]
                    [--device cpu|cuda] [--quick] [--json out.json]

How it measures, so that the numbers mean the same on every machine:
- every contender has its own parameters (fp32, the shapes of the chosen set) and state;
  the gradients are set once and shared by the contenders of a family (none writes them);
- a measurement is k = 5 consecutive steps timed together, divided by k: one Lookahead
  cycle, with its one sync step amortised as a user sees it; one cycle before the first
  measurement allocates the state and warms caches;
- contenders are measured round-robin, one cycle each per repetition, with the starting
  contender rotated, so drift in the machine (clocks, other load) hits all alike;
- the table shows the median over repetitions and the min-max; GB/s is the minimum traffic
  (contenders.PLAIN_BYTES, +SYNC_EXTRA_BYTES on a sync step) over the median time, so the
  fastest possible kernel on a machine sits at that machine's memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lookahead_fused.check import default_device, machine_info

from .contenders import FAMILIES, PLAIN_BYTES, SYNC_EXTRA_BYTES, Contender, K, contenders
from .params import NAMES as SET_NAMES
from .params import ParamSet, param_set

# Repetitions: a ResNet-152 step takes 30-500 ms on a CPU and about a millisecond on a GPU.
DEFAULT_REPS = {"cpu": 5, "cuda": 20}
QUICK_REPS = 2


@dataclass
class Result:
    contender: Contender
    seconds: list[float] = field(default_factory=list)  # per step, one entry per repetition
    unavailable: str | None = None
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cycle(opt: Optimizer, device: torch.device) -> float:
    """Seconds per step over one Lookahead cycle of K steps."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(K):
        opt.step()
    _synchronize(device)
    return (time.perf_counter() - start) / K


def _prepare(contender: Contender, pset: ParamSet, grads: list[Tensor], device: torch.device) -> Optimizer:
    params = pset.make(device)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt = contender.build(params)
    _time_cycle(opt, device)  # warm-up: state allocation, first-touch page faults, lazy init
    return opt


def measure(entries: list[Contender], pset: ParamSet, device: torch.device, reps: int) -> list[Result]:
    """Times every available contender (all of one family) interleaved round-robin."""
    results = [Result(c, unavailable=c.unavailable) for c in entries]
    grads = pset.make(device, requires_grad=False)
    for g in grads:
        g.mul_(1e-2)  # gradient-sized values keep Adam's and SGD's updates small over many steps
    live: list[tuple[Result, Optimizer]] = []
    for result in results:
        if result.contender.build is None:
            continue
        try:
            live.append((result, _prepare(result.contender, pset, grads, device)))
        except NotImplementedError as e:  # a contender still being written
            result.unavailable = f"not implemented yet{': ' + str(e) if str(e) else ''}"
        except Exception as e:  # one broken contender must not hide the others' numbers
            result.error = f"{type(e).__name__}: {e}"
    for rep in range(reps):
        shift = rep % len(live) if live else 0
        for result, opt in live[shift:] + live[:shift]:
            result.seconds.append(_time_cycle(opt, device))
    return results


def _row(result: Result, baseline: float | None, floor: float | None, numel: int) -> dict[str, Any]:
    c = result.contender
    row: dict[str, Any] = {
        "name": c.name,
        "family": c.family.name,
        "lookahead": c.lookahead,
        "bytes_per_param": c.bytes_per_param,
        "unavailable": result.unavailable,
        "error": result.error,
    }
    if result.seconds:
        row.update(
            times_ms=[s * 1e3 for s in result.seconds],
            median_ms=result.median * 1e3,
            min_ms=min(result.seconds) * 1e3,
            max_ms=max(result.seconds) * 1e3,
            gb_per_s=c.bytes_per_param * numel / result.median / 1e9,
            vs_torch_fused=result.median / baseline if baseline else None,
            # The fraction of the bandwidth floor reached (Lookahead rows: same accesses).
            of_floor=floor / result.median if floor and c.lookahead and not c.floor else None,
        )
    return row


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'contender':<42} {'median ms':>10} {'min-max ms':>17} {'GB/s':>7} {'x torch fused':>13} {'of floor':>8}")
    for family in FAMILIES:
        family_rows = [r for r in rows if r["family"] == family.name]
        if family_rows:
            print(f"{family.torch_class.__name__}:")
        for r in family_rows:
            if "median_ms" not in r:
                print(
                    f"  {r['name']:<40} {'error: ' + r['error'] if r['error'] else 'unavailable: ' + r['unavailable']}"
                )
                continue
            ratio = f"{r['vs_torch_fused']:.2f}" if r["vs_torch_fused"] else "-"
            spread = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
            of_floor = f"{r['of_floor']:.0%}" if r["of_floor"] else "-"
            timing = f"{r['median_ms']:>10.2f} {spread:>17} {r['gb_per_s']:>7.1f}"
            print(f"  {r['name']:<40} {timing} {ratio:>13} {of_floor:>8}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=SET_NAMES, help="parameter set (default resnet152; tiny with --quick)")
    parser.add_argument("--family", choices=[f.name for f in FAMILIES], action="append", help="default: all")
    reps_help = ", ".join(f"{n} on {d}" for d, n in DEFAULT_REPS.items())
    parser.add_argument("--reps", type=int, help=f"repetitions (default {reps_help}; {QUICK_REPS} with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny set and few repetitions: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the machine, settings and results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    reps = args.reps if args.reps is not None else QUICK_REPS if args.quick else DEFAULT_REPS[device.type]
    if reps < 1:
        parser.error(f"--reps must be at least 1, got {reps}")
    pset = param_set(args.set or ("tiny" if args.quick else "resnet152"))
    families = tuple(args.family or (f.name for f in FAMILIES))

    machine = machine_info()
    gpu = machine["gpus"][device.index or 0]["name"] if device.type == "cuda" else "none"
    print(
        f"bench: one optimizer step on {pset.name} ({pset.tensors} tensors, {pset.numel:,} fp32 parameters), {device}"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cpu_count']} cores (load average {machine['load_average']}), "
        f"torch threads {machine['torch_threads']}, "
        f"GPU {gpu}; python {machine['python']}, torch {machine['torch']}, triton {machine['triton'] or '-'}"
    )
    print(
        f"per step: k={K} consecutive steps timed together / k, contenders interleaved, {reps} repetitions; "
        f"GB/s at minimum traffic ({', '.join(f'{n} {b}/{b + SYNC_EXTRA_BYTES} B' for n, b in PLAIN_BYTES.items())} "
        "per param plain/sync)",
        flush=True,
    )

    rows = []
    for family in families:
        results = measure(contenders(device, (family,)), pset, device, reps)
        baseline = next((r.median for r in results if r.contender.baseline and r.seconds), None)
        floor = next((r.median for r in results if r.contender.floor and r.seconds), None)
        rows += [_row(r, baseline, floor, pset.numel) for r in results]
    _print_table(rows)

    if args.json:
        report = {
            "machine": machine,
            "device": str(device),
            "set": {"name": pset.name, "tensors": pset.tensors, "params": pset.numel},
            "dtype": "float32",
            "k": K,
            "repetitions": reps,
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
