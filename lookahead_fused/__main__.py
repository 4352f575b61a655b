"""Command line: `python -m lookahead_fused check|info|gpu-report`.

python -m lookahead_fused check [--device cpu|cuda] [--backend NAME ...] [--quick] [--json PATH]
    every backend usable on the device against the eager reference; exit status 1 on
    any disagreement beyond the tolerances of lookahead_fused.testing
python -m lookahead_fused info
    versions, devices, which backends can run and why not, the build of lookahead_fused._C
    (or that it is missing, and which backends remain without it)
python -m lookahead_fused gpu-report [--dry-run] [--only STAGE,...] OUTDIR
    runs bench/gpu_report.sh of a source checkout: build, check, GPU tests, sanitizers and
    benchmark on a GPU machine, reported under OUTDIR (report.md, report.json)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _extension, backends, check


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lookahead_fused", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("check", help="compare every usable backend with the reference")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    run.add_argument("--backend", action="append", choices=backends.NAMES, help="check only these (repeatable)")
    run.add_argument("--quick", action="store_true", help="a sample of the variants (seconds instead of minutes)")
    run.add_argument("--json", metavar="PATH", help="also write the table as JSON (rewritten after every row)")
    commands.add_parser("info", help="versions, devices, backends and the build of the extension")
    # Its arguments are the script's own (handed over untouched by main(); --help is the script's).
    commands.add_parser(
        "gpu-report",
        add_help=False,
        help="bench/gpu_report.sh [--dry-run] [--only STAGE,...] OUTDIR: build, check, GPU tests, "
        "sanitizers and benchmark on a GPU machine",
    )
    return parser


GPU_REPORT = Path(__file__).resolve().parents[1] / "bench" / "gpu_report.sh"


def _gpu_report(args: Sequence[str]) -> int:
    """Replaces this process with the report script (it needs a source checkout: it builds _C)."""
    if not GPU_REPORT.is_file():
        print(f"gpu-report needs a source checkout of lookahead_fused: {GPU_REPORT} not found", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvp("bash", ["bash", str(GPU_REPORT), *args])
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gpu-report"]:
        return _gpu_report(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "info" and _extension.ERROR is not None:
        # `info` prints it in its report; `import lookahead_fused` did not warn under -m.
        print(f"warning: {_extension.missing_message()}", file=sys.stderr)
    if args.command == "info":
        check.print_info()
        return 0
    device = torch.device(args.device) if args.device else check.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch (see `python -m lookahead_fused info`)")
    return check.run_check(device, args.backend or (), args.quick, args.json)


if __name__ == "__main__":
    sys.exit(main())
