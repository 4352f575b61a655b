"""The guest side of tests/test_cpu_isa_emulated.py: run under `qemu-x86_64 -cpu <model>`,
a CPU without the ISA levels above the one the test expects.

    qemu-x86_64 -cpu Haswell python tests/isa_worker.py

Imports lookahead_fused as a user does (the installed `_C`, `_tensor_keys` where built),
steps the "cpu" backend through every variant of `lookahead_fused.testing.variants()` in
fp32, bf16 and fp16 against the eager reference, asks for every ISA level built, and prints
one JSON object as its last line of output:

- "isa", "supported", "built": the level the kernels run, those this CPU runs, those built;
- "refused": {level: message} for each level built that `cpu_set_isa` refused;
- "failures": the reference comparisons that failed; "kernel_calls": for each run, how many
  times the compiled kernels ran (so that a silent fallback to the eager backend does not
  pass);
- "tensor_keys": whether the C++ layout checks were in use.

An instruction this CPU lacks ends the process with SIGILL before that line.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lookahead_fused import _C, _extension, testing  # type: ignore[attr-defined]
from lookahead_fused.backends import cpu

STEPS = 7  # each run: at least one kernel call a step
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Counting:
    """`_C` with its `lookahead_step` calls counted."""

    def __init__(self, module: Any) -> None:
        self._module, self.calls = module, 0

    def lookahead_step(self, args: Any) -> Any:
        self.calls += 1
        return self._module.lookahead_step(args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def main() -> None:
    info = _C.build_info()
    out: dict[str, Any] = {
        "isa": _C.cpu_isa(),
        "supported": list(info["cpu_isas_supported"]),
        "built": list(info["cpu_isas"]),
        "tensor_keys": _extension.TENSOR_KEYS is not None,
    }
    counting = _Counting(_C)
    cpu._C = counting
    failures, calls = [], []
    for dtype in DTYPES:
        for variant in testing.variants():
            before = counting.calls
            report = testing.run_against_reference("cpu", variant, dtype, steps=STEPS)
            failures += [f"{variant.name} {dtype}: {f}" for f in report.failures[:3]]
            calls.append(counting.calls - before)
    out["failures"], out["kernel_calls"] = failures, calls

    selected, refused = out["isa"], {}
    for level in out["built"]:
        try:
            _C.cpu_set_isa(level)
        except ValueError as e:
            refused[level] = str(e)
    _C.cpu_set_isa(selected)
    out["refused"] = refused
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
