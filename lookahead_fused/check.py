"""What `python -m lookahead_fused check` and `python -m lookahead_fused info` report.

`check` steps every backend usable on a device beside the eager reference over the variant
matrix of `lookahead_fused.testing` (every variant x fp32/bf16 x with/without GradScaler),
with the tolerances stated there, and prints one row per backend and dtype. It is the first
thing to run on a new machine: a backend that disagrees with the reference there is a bug.

`info` prints what the machine has and which backends can run on it; `machine_info()` is
also the header of the benchmark (`python -m bench`), so both describe a machine alike.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__, _extension, backends, testing

DTYPES = (torch.float32, torch.bfloat16)
GRAD_SCALER = (False, True)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        return importlib.import_module("triton").__version__
    except ImportError:
        return None


def extension_info() -> dict[str, Any] | str:
    """`lookahead_fused._C.build_info()` when the compiled extension imports, else why not."""
    try:
        ext = importlib.import_module("lookahead_fused._C")
    except ImportError as e:
        return f"not built ({e})"
    build_info = getattr(ext, "build_info", None)
    return dict(build_info()) if build_info is not None else "built (no build_info())"


def machine_info() -> dict[str, Any]:
    """Versions and devices, as printed by `info` and recorded by the benchmark."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return {
        "lookahead_fused": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine competes for memory bandwidth and cores: timings taken
        # under a load near the core count are not the machine's
        "load_average": round(os.getloadavg()[0], 2),
        "gpus": gpus,
        # how each step checks the tensors' layouts: host time per step depends on it
        "layout_checks": "C++" if _extension.TENSOR_KEYS is not None else "Python",
    }


def backend_status(device: torch.device) -> dict[str, str | None]:
    """Backend name -> why it cannot run on `device`, or None when it can."""
    return {name: backends.unavailable(name, device) for name in backends.NAMES}


def print_info() -> None:
    info = machine_info()
    print(f"lookahead_fused {info['lookahead_fused']} ({os.path.dirname(__file__)})")
    print(
        f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), "
        f"triton {info['triton'] or 'not installed'}, TRITON_INTERPRET={info['triton_interpret'] or 'unset'}"
    )
    print(
        f"cpu: {info['cpu']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
        f"load average {info['load_average']}"
    )
    if info["gpus"]:
        for i, gpu in enumerate(info["gpus"]):
            print(f"cuda:{i}: {gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gib']} GiB")
    else:
        print("cuda: not available")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if info["gpus"] else [])
    usable = {}
    for device in devices:
        print(f"backends on {device}:")
        status = backend_status(device)
        usable[device] = [name for name, why in status.items() if why is None]
        for name, why in status.items():
            print(f"  {name:<14} {'usable' if why is None else 'unavailable: ' + why}")
    keys = _extension.TENSOR_KEYS
    if keys is not None:
        print(f"layout checks: C++ (lookahead_fused._tensor_keys, built for torch {keys.torch_version})")
    else:
        print(f"layout checks: Python, several times the host time per step ({_extension.TENSOR_KEYS_ERROR})")
    ext = extension_info()
    if isinstance(ext, dict):
        print("lookahead_fused._C build info:")
        for key, value in ext.items():
            print(f"  {key}: {value}")
    else:
        # Said once, here: `python -m lookahead_fused` does not warn at import (__init__.py).
        print(f"lookahead_fused._C: MISSING ({_extension.ERROR or ext})")
        print(
            f"  without it the {', '.join(_extension.NEEDS_EXTENSION)} backends cannot run; usable here: "
            + "; ".join(f"{', '.join(names) or 'none'} on {device}" for device, names in usable.items())
        )


@dataclass
class Row:
    """The outcome of one backend in one dtype over the variant matrix."""

    backend: str
    dtype: torch.dtype
    passed: int = 0
    total: int = 0
    max_abs: float = 0.0
    worst: str = "-"
    failures: list[str] = field(default_factory=list)


def _case_name(variant: testing.Variant, grad_scaler: bool) -> str:
    return variant.name + (" +GradScaler" if grad_scaler else "")


def check_backend(name: str, dtype: torch.dtype, device: torch.device, variants: Sequence[testing.Variant]) -> Row:
    row = Row(name, dtype)
    for variant in variants:
        for grad_scaler in GRAD_SCALER:
            case = _case_name(variant, grad_scaler)
            row.total += 1
            try:
                report = testing.run_against_reference(name, variant, dtype, device, grad_scaler=grad_scaler)
            except Exception as e:  # a backend that raises has failed that case; report and go on
                row.failures.append(f"{case}: raised {type(e).__name__}: {e}")
                continue
            if report.max_abs > row.max_abs:
                row.max_abs, row.worst = report.max_abs, f"{case} {report.worst}".strip()
            if report.ok:
                row.passed += 1
            else:
                row.failures.append(f"{case}: {report.failures[0]}")
    return row


def quick_variants() -> list[testing.Variant]:
    """A sample of the matrix for a check in seconds: each variant that brings something not
    seen before (an inner optimizer with an inner_state policy, an option, several groups)."""
    seen: set[str] = set()
    sample = []
    for variant in testing.variants():
        options = variant.kwargs
        features = {f"{variant.kind}/{options.get('inner_state', 'maintain')}", f"groups={variant.groups}"}
        features |= {f"{key}={value}" for key, value in options.items() if key not in ("lr", "inner_state")}
        if not features <= seen:
            seen |= features
            sample.append(variant)
    return sample


def _write_json(path: str, device: torch.device, variants: int, quick: bool, rows: list[Row],
                status: dict[str, str | None], done: bool) -> None:  # fmt: skip
    """The table as JSON, rewritten after every row: a run stopped by a time limit leaves
    the rows it finished (`complete` false)."""
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "variants": variants,
        "grad_scaler": list(GRAD_SCALER),
        "quick": quick,
        "complete": done,
        "rows": [
            {
                "backend": r.backend,
                "dtype": _DTYPE_NAMES[r.dtype],
                "passed": r.passed,
                "total": r.total,
                "max_abs": r.max_abs,
                "worst": r.worst,
                "failures": r.failures,
            }
            for r in rows
        ],
        "unavailable": {name: why for name, why in status.items() if why is not None},
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def run_check(device: torch.device, only: Sequence[str] = (), quick: bool = False, json_path: str | None = None) -> int:
    """Prints the table (and writes it to `json_path` as JSON, if given); returns the process
    exit status (0 when every case passed)."""
    variants = quick_variants() if quick else testing.variants()
    status = backend_status(device)
    names = [n for n in (only or backends.NAMES) if status[n] is None]
    print(
        f"lookahead_fused check on {device} (torch {torch.__version__}): {len(variants)} variants "
        f"x grad_scaler off/on against the reference{' (--quick)' if quick else ''}"
    )
    print(f"{'backend':<14} {'dtype':<5} {'passed':>9} {'max abs err':>12}  worst case")
    rows = []
    for name in names:
        for dtype in DTYPES:
            row = check_backend(name, dtype, device, variants)
            rows.append(row)
            if json_path:
                _write_json(json_path, device, len(variants), quick, rows, status, done=False)
            print(
                f"{name:<14} {_DTYPE_NAMES[dtype]:<5} {f'{row.passed}/{row.total}':>9} {row.max_abs:>12.3g}  "
                f"{row.worst}",
                flush=True,
            )
    for name, why in status.items():
        if why is not None and (not only or name in only):
            print(f"{name:<14} unavailable: {why}")
    if json_path:
        _write_json(json_path, device, len(variants), quick, rows, status, done=True)
    failed = [row for row in rows if row.failures]
    for row in failed:
        print(f"\nFAILED {row.backend} {_DTYPE_NAMES[row.dtype]} ({len(row.failures)} cases):")
        for failure in row.failures:
            print(f"  {failure}")
    if not names:
        print("no backend to check on this device", file=sys.stderr)
        return 1
    return 1 if failed else 0
