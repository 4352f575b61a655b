"""What the Triton interpreter cannot show: the code the GPU would run. The kernels are
compiled offline (no GPU needed) for sm_90 and sm_80 with the options the JIT uses, and
their PTX and resource usage are read:

- every variant the backend can launch compiles;
- ALIGNED variants use 128-bit accesses (`ld.global.v4.b32` / `st.global.v4.b32`: 4 fp32 or
  8 bf16/fp16 elements per access, BLOCK 1024 over 128 threads giving 8 elements a thread),
  unaligned ones 32-/16-bit accesses only;
- no approximate square root or division (`sqrt.approx`, `div.full`, `div.approx`): the
  kernels promise IEEE round-to-nearest (`sqrt.rn`, `div.rn`); amsgrad's max propagates NaN
  (`max.NaN.f32`), as torch.maximum does;
- no spills, and at most REGISTER_BUDGET registers a thread.

The variants come from the backend's own `phases`, `step_constexprs` and
`counter_constexprs` and from `_buckets.state_keys` (which buffers exist), so the test and
the launches cannot drift apart. Which variants: for sm_90 the full product of optimizer
(SGD, SGD with momentum, Adam, AdamW) × launch (phase and SYNC mode, adaptive α's two passes
included) × parameter dtype × ALIGNED, 120 step kernels, with the other choices (state and
slow dtypes, amsgrad, nesterov, maximize, inner_state, grad_scale, lr on the device) picked
greedily so that every pair of values of any two choices occurs; for sm_80 a greedy pairwise
covering of all choices alone; and every counter-kernel variant on both. Compiled once each,
on a process pool over the machine's cores; about 90 s cold on 2 cores (Triton's cache makes
later runs a few seconds).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import multiprocessing
import os
import re
import subprocess
import tempfile
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

from lookahead_fused import triton_kernels as kernels  # noqa: E402
from lookahead_fused._buckets import state_keys  # noqa: E402
from lookahead_fused.backends import triton as backend  # noqa: E402

# Measured: at most 168 registers a thread over every variant with triton 3.9, 200 with triton
# 3.6 (what GPU machines ship with torch 2.11: adaptive alpha's first pass with amsgrad and a
# GradScaler), 20 for the counter kernel. 255 is the hardware's limit; up to 256 a thread,
# two blocks of 128 threads stay resident per SM (64 K registers). 224 keeps that with room,
# and a variant above it is a regression to look at. (With triton 3.6, sm_80 misses it: the
# fp16 adaptive-alpha first pass with amsgrad takes 254 registers and two unaligned 16-bit SGD
# variants spill 8 bytes; sm_90 passes. Checked by hand with triton 3.6 installed beside torch.)
REGISTER_BUDGET = 224
TARGETS = {"sm_90": 90, "sm_80": 80}


def _tools() -> tuple[str, str] | None:
    """Triton's bundled ptxas and cuobjdump, or None."""
    try:
        from triton import knobs

        paths = knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001  an older or a non-NVIDIA build of triton
        return None
    return paths if all(p and os.path.exists(p) for p in paths) else None


pytestmark = pytest.mark.skipif(_tools() is None, reason="Triton's NVIDIA compiler (ptxas, cuobjdump) is absent")

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
KINDS = {"sgd": ("sgd", 0.0), "sgd_momentum": ("sgd", 0.9), "adam": ("adam", 0.0), "adamw": ("adamw", 0.0)}
# The choices beside the launch, each value to be covered pairwise with every other.
CHOICES: dict[str, list[Any]] = {
    "state_dtype": list(DTYPES),
    "slow_dtype": list(DTYPES),
    "amsgrad": [False, True],
    "nesterov": [False, True],
    "maximize": [False, True],
    "inner_state": ["maintain", "reset", "pullback"],
    "grad_scale": [False, True],
    "lr_on_device": [False, True],
}


def _launches(kind: str) -> list[tuple[int, bool, int]]:
    """(SYNC mode, adaptive α, phase) of every step launch the backend makes for a kind."""
    out = []
    for mode in (kernels.SYNC_NEVER, kernels.SYNC_NOW, kernels.SYNC_DEVICE):
        for adaptive in [False, True] if KINDS[kind][0] != "sgd" else [False]:
            group = {"adaptive_alpha": adaptive}
            out += [(mode, phase != kernels.PHASE_STEP, phase) for phase in backend.phases(KINDS[kind][0], group, mode)]
    return sorted(set(out))


def _primary() -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        for (mode, adaptive, phase), dtype, aligned in itertools.product(_launches(kind), DTYPES, [False, True]):
            rows.append(dict(kind=kind, mode=mode, adaptive=adaptive, phase=phase, dtype=dtype, aligned=aligned))
    return rows


def _pairs(row: dict[str, Any]) -> set:
    items = sorted((k, repr(v)) for k, v in row.items())
    return set(itertools.combinations(items, 2))


def _cover(rows: list[dict[str, Any]], choices: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Complete each row with one value per choice, greedily covering the most new pairs."""
    covered: set = set()
    out = []
    for row in rows:
        row = dict(row)
        for name, values in choices.items():
            row[name] = max(values, key=lambda v: len(_pairs({**row, name: v}) - covered))
        covered |= _pairs(row)
        out.append(row)
    return out


def _pairwise(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A greedy pairwise covering of `axes` (every pair of values of two axes in some row)."""
    todo = {p for a, b in itertools.combinations(sorted(axes), 2) for p in itertools.product(
        [(a, repr(v)) for v in axes[a]], [(b, repr(v)) for v in axes[b]])}  # fmt: skip
    rows = []
    while todo:
        (first_axis, first), _ = min(todo)
        row = {first_axis: next(v for v in axes[first_axis] if repr(v) == first)}
        for name in sorted(axes):
            if name not in row:
                row[name] = max(axes[name], key=lambda v: len(_pairs({**row, name: v}) & todo))
        todo -= _pairs(row)
        rows.append(row)
    return rows


def _launch_axes() -> dict[str, list[Any]]:
    launches = sorted({(kind, *launch) for kind in KINDS for launch in _launches(kind)})
    return {"launch": launches, "dtype": list(DTYPES), "aligned": [False, True], **CHOICES}


def _variant(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(constexprs, pointer dtypes) of a row, through the backend's own choice functions."""
    kind, momentum = KINDS[row["kind"]]
    group = dict(
        momentum=momentum,
        nesterov=row["nesterov"] and momentum != 0,
        maximize=row["maximize"],
        amsgrad=row["amsgrad"] and kind != "sgd",
        inner_state=row["inner_state"],
        adaptive_alpha=row["adaptive"],
    )
    constexprs = backend.step_constexprs(
        kind, group, row["dtype"], grad_scale=row["grad_scale"],
        lr_on_device=row["lr_on_device"] and row["mode"] == kernels.SYNC_DEVICE,  # a tensor lr on the device path
        phase=row["phase"], mode=row["mode"], aligned=row["aligned"], block=backend.GPU_BLOCK,
    )  # fmt: skip
    present = set(state_keys(kind, group))
    momentum_key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    buffers = {"momentum_ptr": momentum_key, "exp_avg_sq_ptr": "exp_avg_sq", "max_exp_avg_sq_ptr": "max_exp_avg_sq",
               "cached_ptr": "cached_" + momentum_key}  # fmt: skip
    # An absent buffer is the fp32 zero scalar, as in backend._Launch.
    pointers = {arg: DTYPES[row["state_dtype"]] if key in present else "fp32" for arg, key in buffers.items()}
    pointers["slow_ptr"] = DTYPES[row["slow_dtype"]]
    return constexprs, pointers


def _step_signature(constexprs: dict[str, Any], pointers: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """What the JIT sees at a launch: int64 tables, fp64 partials, fp32 counters and device
    scalars, Python floats as fp32, k as i32."""
    sig = {}
    for name in kernels.lookahead_step_kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("table_ptr", "grad_address_ptr"):
            sig[name] = "*i64"
        elif name == "partial_ptr":
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp32")
        else:
            sig[name] = "i32" if name == "k" else "fp32"
    return sig, {k: (str(v) if isinstance(v, triton.language.dtype) else v) for k, v in constexprs.items()}


def _counter_signature(constexprs: dict[str, Any]) -> dict[str, str]:
    types = {"step_ptr": "*fp32", "lookahead_ptr": "*fp32", "grad_address_ptr": "*i64", "found_inf_ptr": "*fp32"}
    return {
        n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernels.advance_counters_kernel.arg_names
    }


def _compile(job: tuple[str, str, dict[str, str], dict[str, Any], int]) -> dict[str, Any]:
    """In a worker: compile one variant, return its PTX facts and resource usage."""
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lookahead_fused import triton_kernels

    name, kernel, sig, constexprs, arch = job
    fn = getattr(triton_kernels, kernel)
    constexprs = {k: getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[v]) if k == "PARAM_DTYPE"
                  else v for k, v in constexprs.items()}  # fmt: skip
    # The JIT's assumption about torch allocations: every pointer argument is 16-byte aligned.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    compiled = triton.compile(
        ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": backend.NUM_WARPS},
    )  # fmt: skip
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    ops = collections.Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*|sqrt\.\w+|div\.\w+|max\.[\w.]+)", ptx))
    return dict(name=name, ops=ops, regs=int(resources["REG"]), local=int(resources["LOCAL"]) + int(resources["STACK"]))


def _jobs() -> list[tuple[str, dict[str, Any], tuple]]:
    jobs = []
    rows = {"sm_90": _cover(_primary(), CHOICES), "sm_80": []}
    for row in _pairwise(_launch_axes()):
        kind, mode, adaptive, phase = row.pop("launch")
        rows["sm_80"].append(dict(row, kind=kind, mode=mode, adaptive=adaptive, phase=phase))
    for target, arch in TARGETS.items():
        seen = set()
        for row in rows[target]:
            constexprs, pointers = _variant(row)
            sig, plain = _step_signature(constexprs, pointers)
            key = (tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in plain.items())))
            if key not in seen:
                seen.add(key)
                name = f"{target}-{row['kind']}-" + "-".join(f"{k}={v}" for k, v in sorted(plain.items()))
                jobs.append((target, dict(plain, **pointers), (name, "lookahead_step_kernel", sig, plain, arch)))
        for mode, inner_state in itertools.product(
            (kernels.SYNC_NEVER, kernels.SYNC_NOW, kernels.SYNC_DEVICE), ["maintain", "reset"]
        ):
            constexprs = backend.counter_constexprs({"inner_state": inner_state}, mode)
            name = f"{target}-counters-SYNC={mode}-RESET={constexprs['RESET']}"
            jobs.append(
                (target, {}, (name, "advance_counters_kernel", _counter_signature(constexprs), constexprs, arch))
            )
    return jobs


@pytest.fixture(scope="module")
def compiled() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Every variant compiled once, in parallel (spawned workers: no fork of a torch process)."""
    jobs = _jobs()
    env = {k: os.environ.pop(k) for k in ("TRITON_INTERPRET",) if k in os.environ}
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
            results = list(pool.map(_compile, [job for _, _, job in jobs], chunksize=4))
    finally:
        os.environ.update(env)
    return [(target, meta, result) for (target, meta, _), result in zip(jobs, results, strict=True)]


def test_variants_cover_every_choice(compiled) -> None:  # noqa: ANN001
    """Both targets see every value of every constexpr and pointer dtype; sm_90 the full
    product of optimizer × launch × parameter dtype × ALIGNED."""
    for target in TARGETS:
        metas = [meta for t, meta, result in compiled if t == target and meta]
        for name in ["PARAM_DTYPE", "ADAM", "DECOUPLED", "HAS_MOMENTUM", "NESTEROV", "MAXIMIZE", "AMSGRAD",
                     "INNER_STATE", "HAS_GRAD_SCALE", "LR_ON_DEVICE", "ALPHA_ON_DEVICE", "PHASE", "SYNC", "ALIGNED",
                     "momentum_ptr", "slow_ptr"]:  # fmt: skip
            values = {repr(m[name]) for m in metas}
            assert len(values) >= (3 if name in ("PARAM_DTYPE", "INNER_STATE", "PHASE", "SYNC", "slow_ptr") else 2), (
                target, name, values,
            )  # fmt: skip
    assert sum(1 for t, meta, _ in compiled if t == "sm_90" and meta) >= len(_primary())


def test_no_spills_and_registers_within_budget(compiled) -> None:  # noqa: ANN001
    table = collections.Counter()
    bad = []
    for target, meta, result in compiled:
        if result["local"] != 0:
            bad.append(f"{result['name']} spills ({result['local']} bytes of local memory)")
        if result["regs"] > REGISTER_BUDGET:
            bad.append(f"{result['name']} uses {result['regs']} registers")
        where = (target, meta.get("PARAM_DTYPE", "counters"), meta.get("ALIGNED"))
        table[where] = max(table[where], result["regs"])
    print("\nmost registers a thread:", dict(table))
    assert not bad, f"{len(bad)} of {len(compiled)} variants:\n" + "\n".join(bad)


def test_ieee_sqrt_and_division_only(compiled) -> None:  # noqa: ANN001
    for _, _, result in compiled:
        approximate = [op for op in result["ops"] if op.startswith(("sqrt.approx", "div.full", "div.approx"))]
        assert not approximate, f"{result['name']}: {approximate}"


def test_amsgrad_max_propagates_nan(compiled) -> None:  # noqa: ANN001
    for _, meta, result in compiled:
        if meta.get("AMSGRAD") and meta.get("PHASE") != kernels.PHASE_SYNC_ONLY:
            assert result["ops"]["max.NaN.f32"] > 0, result["name"]
        assert result["ops"]["max.f32"] == 0, f"{result['name']}: a max that drops NaN"


def test_aligned_variants_use_128_bit_accesses(compiled) -> None:  # noqa: ANN001
    """ALIGNED: the full blocks load and store 128 bits at a time; the masked tail and the
    unaligned variant use scalar accesses (their rows may start anywhere)."""
    for _, meta, result in compiled:
        if not meta:
            continue  # the counter kernel
        vector = {op: n for op, n in result["ops"].items() if ".v" in op}
        if meta["ALIGNED"]:
            assert result["ops"]["ld.global.v4.b32"] > 0 and result["ops"]["st.global.v4.b32"] > 0, result["name"]
        else:
            assert not vector, f"{result['name']}: {vector}"
