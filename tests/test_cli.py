"""The two README commands and the benchmark command, run as a user runs them.

`python -m lookahead_fused check --quick`, `python -m lookahead_fused info` and
`python -m bench --quick --json --plot` (AdamW and SGD, fp32 and bf16, k=3) run as
subprocesses; the failure paths of `check` run in-process with a backend made to disagree
or to raise.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.contenders import contenders
from bench.params import param_set
from lookahead_fused import __main__ as cli
from lookahead_fused import backends, check, testing

from .conftest import CPU

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_check_quick_passes_every_usable_backend() -> None:
    proc = _run("-m", "lookahead_fused", "check", "--quick", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = 2 * len(check.quick_variants())  # each variant without and with GradScaler
    for name, why in check.backend_status(CPU).items():
        if why is None:
            for dtype in ("fp32", "bf16"):
                assert re.search(rf"^{name}\s+{dtype}\s+{cases}/{cases}\s", proc.stdout, re.M), proc.stdout
        else:
            assert f"{name}" in proc.stdout and f"unavailable: {why}" in proc.stdout
    assert "FAILED" not in proc.stdout


def test_info_lists_versions_and_every_backend() -> None:
    proc = _run("-m", "lookahead_fused", "info")
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout
    for name in backends.NAMES:
        assert re.search(rf"^  {name}\s+(usable|unavailable: .+)$", proc.stdout, re.M), proc.stdout
    assert "lookahead_fused._C" in proc.stdout
    # which layout checks this build runs (test_tensor_keys.py requires the C++ ones here)
    assert f"layout checks: C++ (lookahead_fused._tensor_keys, built for torch {torch.__version__})" in proc.stdout


def _disagreeing(backend: str):
    """run_against_reference, except that `backend` is off by 1 in its first case and raises in its second."""
    real = testing.run_against_reference
    calls = []

    def run(name, variant, *args, **kwargs):
        report = real(name, variant, *args, **kwargs)
        if name == backend:
            calls.append(variant)
            if len(calls) == 1:
                report.compare("step 1 param 0", torch.ones(3), torch.zeros(3), testing.TOLERANCES[torch.float32])
            elif len(calls) == 2:
                raise RuntimeError("kernel exploded")
        return report

    return run


def test_check_fails_on_a_disagreeing_backend(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(testing, "run_against_reference", _disagreeing("eager"))
    status = cli.main(["check", "--quick", "--device", "cpu", "--backend", "eager", "--backend", "foreach"])
    out = capsys.readouterr().out
    assert status == 1
    cases = 2 * len(check.quick_variants())
    assert re.search(rf"^eager\s+fp32\s+{cases - 2}/{cases}\s+1\s", out, re.M), out  # max abs error 1
    assert re.search(rf"^foreach\s+fp32\s+{cases}/{cases}\s", out, re.M), out
    assert "FAILED eager fp32 (2 cases)" in out
    assert "beyond atol" in out and "raised RuntimeError: kernel exploded" in out


def test_check_refuses_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--device", "cuda"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_quick_variants_cover_every_option() -> None:
    sample = check.quick_variants()
    every = testing.variants()
    assert len(sample) < len(every)
    options = {(key, repr(value)) for v in every for key, value in v.options if key != "lr"}
    assert options == {(key, repr(value)) for v in sample for key, value in v.options if key != "lr"}
    assert {v.kind for v in sample} == {v.kind for v in every}
    assert {v.groups for v in sample} == {v.groups for v in every}


def test_bench_quick_writes_table_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    configs = ["--family", "adamw", "--family", "sgd", "--dtype", "fp32", "--dtype", "bf16", "--k", "3"]
    proc = _run("-m", "bench", "--quick", "--device", "cpu", *configs, "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"machine", "device", "sets", "dtypes", "ks", "families", "repetitions", "results"} <= set(report)
    assert {"cpu", "torch_threads", "torch", "python", "gpus"} <= set(report["machine"])
    assert report["machine"]["torch"] == torch.__version__
    assert (report["dtypes"], report["ks"], report["families"]) == (["fp32", "bf16"], [3], ["adamw", "sgd"])
    (name,) = report["sets"]
    pset = param_set(name)
    assert report["sets"][name] == {"params": pset.numel, "tensors": pset.tensors}
    # one block per dtype, each every contender of the families in table order
    expected = [(dtype, c.name) for dtype in ("fp32", "bf16") for c in contenders(CPU, ("adamw", "sgd"), k=3)]
    assert [(r["dtype"], r["name"]) for r in report["results"]] == expected
    timed = [r for r in report["results"] if "median_ms" in r]
    # the fused class on every usable backend and torch's own optimizers are always timed
    names = {(r["dtype"], r["name"]) for r in timed}
    for dtype in ("fp32", "bf16"):
        assert {(dtype, "torch AdamW(fused=True)"), (dtype, "torch SGD(fused=True)")} <= names
        assert {(dtype, "LookaheadAdamW(backend=eager)"), (dtype, "LookaheadSGD(backend=cpu)")} <= names
    for r in timed:
        assert r["error"] is None and r["k"] == 3 and r["set"] == name
        assert len(r["times_ms"]) == report["repetitions"]
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        gbps = r["bytes_per_param"] * pset.numel / (r["median_ms"] * 1e-3) / 1e9
        assert r["gb_per_s"] == pytest.approx(gbps)
        assert (r["sync_ms"] is not None) == r["lookahead"]  # the sync step alone, for Lookahead rows
        assert r["graph_median_ms"] is None and r["graph_unavailable"] == "CUDA graphs need a GPU"
        assert r["name"] in proc.stdout
        if r["name"].startswith("floor"):
            assert r["extra_mib"] is None and r["launches_per_step"] >= 1
        else:  # the state: at least one fp32 or bf16 buffer of the parameters' size
            assert r["extra_mib"] * 2**20 >= 2 * pset.numel
        if r["name"].endswith("(backend=cpu)"):
            assert r["launches_per_step"] == 1 and r["of_floor"] > 0  # one pass a step, same bytes as the floor
    for r in report["results"]:
        if "median_ms" not in r:
            assert r["unavailable"] and f"unavailable: {r['unavailable']}" in proc.stdout
    # DESIGN §4's minimum traffic: θ g (param dtype) + state + φ (fp32) amortised over k
    for family, plain in (("adamw", 28), ("sgd", 20)):
        for dtype, saved in (("fp32", 0), ("bf16", 6)):  # 3 accesses of θ/g at 2 B instead of 4
            rows = [r for r in report["results"] if (r["family"], r["dtype"]) == (family, dtype)]
            fused = [r["bytes_per_param"] for r in rows if r["name"].startswith(("Lookahead", "floor"))]
            assert fused == [pytest.approx(plain - saved + 8 / 3)] * len(fused) and len(fused) > 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" or "matplotlib is not installed" in proc.stdout


def test_bench_suite_collects_and_runs() -> None:
    proc = _run("-m", "pytest", "bench", "-q", "--benchmark-disable", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\d+ passed", proc.stdout)
