"""Command line: `python -m lookahead_fused check|info`.

python -m lookahead_fused check [--device cpu|cuda] [--backend NAME ...] [--quick]
    every backend usable on the device against the eager reference; exit status 1 on
    any disagreement beyond the tolerances of lookahead_fused.testing
python -m lookahead_fused info
    versions, devices, which backends can run and why not, the build of lookahead_fused._C
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import backends, check


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lookahead_fused", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("check", help="compare every usable backend with the reference")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    run.add_argument("--backend", action="append", choices=backends.NAMES, help="check only these (repeatable)")
    run.add_argument("--quick", action="store_true", help="a sample of the variants (seconds instead of minutes)")
    commands.add_parser("info", help="versions, devices, backends and the build of the extension")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        check.print_info()
        return 0
    device = torch.device(args.device) if args.device else check.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch (see `python -m lookahead_fused info`)")
    return check.run_check(device, args.backend or (), args.quick)


if __name__ == "__main__":
    sys.exit(main())
