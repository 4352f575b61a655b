"""bench/gpu_report.sh, the first command on a GPU machine, checked here without one: its
--dry-run finds everything it names (files, modules, subcommands and flags, the pytest marker
`gpu`), fails when something is missing, and a run of selected stages writes a valid JSON and
a Markdown report in which a failing stage is recorded and does not stop the others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_report.sh"
STAGES = ("versions", "build", "check", "pytest", "memcheck", "racecheck", "bench")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str, script: Path = SCRIPT, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_dry_run_finds_everything_it_names() -> None:
    done = _run("--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "MISSING" not in out and "dry run: everything named exists" in out
    for stage in STAGES:
        assert f"== stage {stage}" in out
    for command in ("compute-sanitizer", "--tool memcheck", "--tool racecheck", "-m pytest -m gpu",
                    "-m lookahead_fused check --device cuda", "-m bench --set resnet152", "TORCH_CUDA_ARCH_LIST",
                    "get_device_capability", "pytest marker gpu"):  # fmt: skip
        assert command in out, command


def test_dry_run_fails_when_a_named_file_is_missing(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    copy = tmp_path / "bench" / "gpu_report.sh"
    shutil.copy(SCRIPT, copy)
    done = _run("--dry-run", "--only", "memcheck", script=copy)
    assert done.returncode != 0
    assert "MISSING  file bench/sanitize_step.py" in done.stdout
    assert "MISSING  file tests/test_gpu.py" in done.stdout


def test_selected_stages_write_a_valid_report(tmp_path: Path) -> None:
    """Without a GPU, 'versions' passes and 'check --device cuda' fails (no CUDA): both are
    recorded, the report is valid JSON, and the exit status says something failed."""
    out = tmp_path / "report"
    done = _run("--only", "versions,check", str(out))
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert set(by_stage) == {"versions", "check"}
    assert by_stage["versions"]["status"] == "pass"
    assert by_stage["check"]["status"] == "fail" and by_stage["check"]["rc"] != 0
    assert report["passed"] is False
    assert "torch" in by_stage["versions"]["tail"]
    md = (out / "report.md").read_text()
    assert "| versions | pass |" in md and "| check | fail" in md
    assert (out / "01-versions.log").exists() and (out / "03-check.log").exists()


def test_unknown_stage_and_missing_outdir_are_refused() -> None:
    assert _run("--only", "nope", "x").returncode == 2
    assert _run().returncode == 2


def test_the_cli_runs_the_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lookahead_fused", "gpu-report", "--only", "nope", "x"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "unknown stage 'nope'" in done.stderr


def test_sanitize_step_runs_on_the_host_build() -> None:
    """The sanitizers' program, on cuda_emulated: every family, both dtypes, finite."""
    pytest.importorskip("lookahead_fused._C")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sanitize_step.py"), "--device", "cpu", "--backend", "cuda_emulated"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": ok") == 10


def test_a_stage_past_its_limit_gets_sigint_and_keeps_its_log(tmp_path: Path) -> None:
    """A stage that outlives its time limit is sent SIGINT, not SIGTERM, so that pytest can
    still write its summary and bench its JSON: here a stand-in for `python -m lookahead_fused
    check` that only a SIGINT stops cleanly, under a 12 s budget."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case " $* " in *" lookahead_fused check "*)\n'
        "  sleep 100 </dev/null >/dev/null 2>&1 &\n"
        "  trap 'kill $!; echo \"stopped by SIGINT\"; exit 3' INT\n"
        "  trap 'kill $!; echo \"stopped by SIGTERM\"; exit 4' TERM\n"
        '  echo "check started"; wait; echo "never interrupted"; exit 0 ;;\n'
        "esac\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": str(fake), "GPU_REPORT_BUDGET": "12", "GIT_COMMIT": "f" * 40}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--only", "check", str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    log = (out / "03-check.log").read_text()
    assert "check started" in log and "stopped by SIGINT" in log, log
    report = json.loads((out / "report.json").read_text())
    (stage,) = report["stages"]
    assert stage["status"] == "timeout" and stage["rc"] == 124
    assert report["commit"] in ("f" * 40, subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip())  # fmt: skip


def test_time_a_stage_leaves_unused_goes_to_the_next(tmp_path: Path) -> None:
    """A stage's limit is its own plus what the stages before it left unused, keeping the
    limits of the stages after it in reserve: versions (20 s of its own) may use the whole
    budget but memcheck's 30 s, and memcheck (no compute-sanitizer here: it fails at once)
    gets what is left, more than its own 30 s."""
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_REPORT_BUDGET": "200"}
    done = subprocess.run(["bash", str(SCRIPT), "--only", "versions,memcheck", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert by_stage["versions"]["limit_s"] == 200 - 30, done.stdout
    # What is left of the budget, in the script's whole seconds (`date +%s`): 200 − elapsed, give or take.
    left = 200 - by_stage["versions"]["seconds"]
    assert 30 < by_stage["memcheck"]["limit_s"] <= 200 and abs(by_stage["memcheck"]["limit_s"] - left) <= 3, done.stdout
