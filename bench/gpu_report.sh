#!/usr/bin/env bash
# The first command to run on a machine with an NVIDIA GPU (DESIGN.md §5):
#
#     bash bench/gpu_report.sh OUTDIR              # e.g. docs/gpu/2027-01-15-h200
#     bash bench/gpu_report.sh --dry-run           # what it would run; checks that it all exists
#     bash bench/gpu_report.sh --only versions,check OUTDIR
#
# Needs no network: torch and triton installed, nvcc (PATH or /usr/local/cuda/bin), cmake,
# ninja and pybind11 for the build. Stages, each under its own time limit (seconds, below), with
# its log in OUTDIR; a failing stage does not stop the others:
#   versions   nvidia-smi, python, torch, triton, nvcc, compute-sanitizer, cmake, ninja
#   build      lookahead_fused._C for this GPU's architecture (TORCH_CUDA_ARCH_LIST from
#              torch.cuda.get_device_capability()), the CMake build pip runs, in a fresh folder,
#              into the folder this python imports lookahead_fused._C from (an editable
#              install's, else the source tree's); then _tensor_keys, where it fails only a warning
#   check      python -m lookahead_fused check --device cuda: every backend, fp32/bf16, GradScaler;
#              the hand-written CUDA kernels first, then Triton (whose cold compiles take the
#              longest), foreach and eager, so that a time limit cuts the least informative rows
#   pytest     pytest -m gpu: graph capture and replay vs eager, dtypes vs the reference, devices
#   memcheck   compute-sanitizer --tool memcheck on bench/sanitize_step.py (every kernel family)
#   racecheck  compute-sanitizer --tool racecheck on the same, fp32 only
#   bench      python -m bench --set resnet152 (CUDA events, graph replay), few repetitions
# The whole run is bounded by GPU_REPORT_BUDGET seconds (default 470, for an 8-minute slot):
# a stage gets its own limit plus what the stages before it left unused (what is left of the
# budget less the limits of the selected stages after it), never more than what is left; with
# under 10 s left it is skipped.
# A stage past its limit gets SIGINT (then SIGKILL 15 s later): pytest still writes its summary
# and pytest.xml, bench and check keep the JSON of what they measured.
# The commit is read with git, or from GIT_COMMIT where the tree has no .git (a copied tree).
# OUTDIR gets report.md, report.json (built by Python, valid JSON), one log per stage,
# check.json, bench.json and pytest.xml. Exit status: 0 when every stage run passed.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; *) PY=$(command -v "$PY") ;; esac
CALLER=$PWD
cd "$ROOT" || exit 2
BUDGET=${GPU_REPORT_BUDGET:-470}
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 # real Triton on the GPU (tests/conftest.py only sets it when unset)

STAGES=(versions build check pytest memcheck racecheck bench)
declare -A LIMIT=([versions]=20 [build]=120 [check]=120 [pytest]=75 [memcheck]=30 [racecheck]=45 [bench]=45)

DRY=0
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_report.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do
    [ -n "${LIMIT[$s]+x}" ] || { echo "gpu_report.sh: unknown stage '$s' (stages: ${STAGES[*]})" >&2; exit 2; }
  done
fi
if [ "$DRY" = 0 ] && [ -z "$OUT" ]; then
  echo "usage: bash bench/gpu_report.sh [--dry-run] [--only STAGE,...] OUTDIR" >&2
  exit 2
fi
case "$OUT" in ""|/*) ;; *) OUT="$CALLER/$OUT" ;; esac
OUTDIR=${OUT:-OUTDIR}
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
fi
BUILD="$ROOT/build/gpu-report"
SANITIZE="PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 1 --print-limit 20"

stage_command() {
  case "$1" in
    versions) cat <<EOF
{ nvidia-smi || echo 'nvidia-smi: not found'; }
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); [print(f"cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo 'triton: not installed'
{ nvcc --version || echo 'nvcc: not found'; }
{ compute-sanitizer --version || echo 'compute-sanitizer: not found'; }
{ cmake --version | head -1; ninja --version; } || echo 'cmake/ninja: not found'
"$PY" -c 'import pybind11; print("pybind11", pybind11.__version__)' || echo 'pybind11: not installed'
EOF
      ;;
    build) cat <<EOF
export TORCH_CUDA_ARCH_LIST=\$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') && echo "TORCH_CUDA_ARCH_LIST=\$TORCH_CUDA_ARCH_LIST" &&
LIBDIR=\$("$PY" -c 'import importlib.util, os; s = importlib.util.find_spec("lookahead_fused._C"); print(os.path.dirname(s.origin) if s and s.origin else "")' 2>/dev/null); LIBDIR=\${LIBDIR:-$ROOT/lookahead_fused} && echo "_C goes to \$LIBDIR" &&
rm -rf "$BUILD" &&
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="\$("$PY" -m pybind11 --cmakedir)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="\$LIBDIR" -DCMAKE_BUILD_TYPE=Release &&
cmake --build "$BUILD" --target _C &&
{ cmake --build "$BUILD" || echo "warning: lookahead_fused._tensor_keys did not build: layout checks in Python (host ms)"; } &&
"$PY" -c 'import torch; from lookahead_fused import _C, backends; print(_C.__file__); info = _C.build_info(); print(info); assert info["cuda"], "built without CUDA"; why = backends.unavailable("cuda", torch.device("cuda", 0)); assert why is None, why; print("backend cuda: usable")' &&
"$PY" -m lookahead_fused info
EOF
      ;;
    check) echo "\"$PY\" -m lookahead_fused check --device cuda --backend cuda --backend triton --backend foreach --backend eager --json \"$OUTDIR/check.json\"" ;;
    pytest) echo "\"$PY\" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml=\"$OUTDIR/pytest.xml\" tests" ;;
    memcheck) echo "$SANITIZE --tool memcheck \"$PY\" bench/sanitize_step.py" ;;
    racecheck) echo "$SANITIZE --tool racecheck \"$PY\" bench/sanitize_step.py --dtype fp32" ;;
    bench) echo "\"$PY\" -m bench --set resnet152 --device cuda --reps 5 --json \"$OUTDIR/bench.json\"" ;;
  esac
}

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# --- dry run: print the plan, check that what it names exists -----------------------------
if [ "$DRY" = 1 ]; then
  missing=0
  echo "gpu_report.sh --dry-run (root $ROOT, python $PY, budget ${BUDGET}s)"
  for s in "${STAGES[@]}"; do
    selected "$s" || continue
    echo "== stage $s (limit ${LIMIT[$s]}s)"
    stage_command "$s" | sed 's/^/    /'
  done
  echo "== checks"
  for f in CMakeLists.txt pyproject.toml bench/sanitize_step.py bench/__main__.py tests/test_gpu.py tests/conftest.py \
           lookahead_fused/__main__.py lookahead_fused/check.py; do
    if [ -f "$ROOT/$f" ]; then echo "ok       file $f"; else echo "MISSING  file $f"; missing=1; fi
  done
  for m in lookahead_fused lookahead_fused.check bench bench.params pytest; do
    if (cd "$ROOT" && "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$m') is None)") 2>/dev/null; then
      echo "ok       python module $m"
    else
      echo "MISSING  python module $m"; missing=1
    fi
  done
  check_help() { # command, then the strings its --help must show
    local cmd=$1; shift
    local help
    help=$(cd "$ROOT" && eval "$cmd --help" 2>&1) || { echo "MISSING  command $cmd"; missing=1; return; }
    for word in "$@"; do
      if grep -q -- "$word" <<<"$help"; then echo "ok       $cmd: $word"; else echo "MISSING  $cmd: $word"; missing=1; fi
    done
  }
  check_help "\"$PY\" -m lookahead_fused check" --device --json
  check_help "\"$PY\" -m lookahead_fused" gpu-report
  check_help "\"$PY\" -m bench" --set resnet152 --device --reps --json
  check_help "\"$PY\" bench/sanitize_step.py" --dtype --backend
  # grep reads all of it (not -q): stopping at the first line would leave pytest writing into a
  # closed pipe, and its failure (pipefail) would read as a missing marker.
  if (cd "$ROOT" && "$PY" -m pytest --markers -p no:cacheprovider 2>/dev/null) | grep '@pytest.mark.gpu:' >/dev/null; then
    echo "ok       pytest marker gpu"
  else
    echo "MISSING  pytest marker gpu (tests/conftest.py)"; missing=1
  fi
  # Tools of the GPU machine: reported, not required here.
  for tool in nvidia-smi nvcc compute-sanitizer cmake ninja timeout; do
    if command -v "$tool" >/dev/null 2>&1; then echo "ok       tool $tool"; else echo "absent   tool $tool (needed on the GPU machine)"; fi
  done
  if [ "$missing" = 0 ]; then echo "dry run: everything named exists"; else echo "dry run: something named is missing"; fi
  exit "$missing"
fi

# --- the run -------------------------------------------------------------------------------
TSV="$OUTDIR/stages.tsv"
: >"$TSV"
START=$(date +%s)
n=0
for s in "${STAGES[@]}"; do
  n=$((n + 1))
  selected "$s" || continue
  log="$OUTDIR/$(printf '%02d' "$n")-$s.log"
  left=$((BUDGET - ($(date +%s) - START)))
  reserve=0 # the limits of the selected stages after this one
  for later in "${STAGES[@]:$n}"; do
    selected "$later" && reserve=$((reserve + LIMIT[$later]))
  done
  limit=${LIMIT[$s]}
  [ $((left - reserve)) -gt "$limit" ] && limit=$((left - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $s: skipped (${left}s of the budget left)"
    printf '%s\tskipped\t\t0\t%s\t%s\n' "$s" "${LIMIT[$s]}" "$(basename "$log")" >>"$TSV"
    continue
  fi
  cmd=$(stage_command "$s")
  echo "== $s (limit ${limit}s, log $log)"
  {
    echo "# stage $s, limit ${limit}s, $(date -u +%FT%TZ)"
    echo "$cmd" | sed 's/^/# /'
  } >"$log"
  t0=$(date +%s.%N)
  timeout -s INT --kill-after=15 "$limit" bash -c "$cmd" >>"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=pass ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  echo "   $status (rc $rc, ${secs}s)"
  tail -n 5 "$log" | sed 's/^/   | /'
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$status" "$rc" "$secs" "$limit" "$(basename "$log")" >>"$TSV"
done

"$PY" - "$OUTDIR" "$BUDGET" "$ROOT" <<'EOF'
"""report.md and report.json from stages.tsv, the logs, check.json and bench.json."""
import datetime
import json
import os
import subprocess
import sys

out, budget, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
TAIL = {"check": 80, "bench": 80}  # lines of each log shown in report.md (the bench table is long)
stages = []
with open(os.path.join(out, "stages.tsv")) as f:
    for line in f:
        name, status, rc, secs, limit, log = line.rstrip("\n").split("\t")
        path = os.path.join(out, log)
        tail = ""
        if os.path.exists(path):
            with open(path, errors="replace") as lf:
                lines = lf.read().splitlines()
            tail = "\n".join(lines[-TAIL.get(name, 40):])
        stages.append({"stage": name, "status": status, "rc": int(rc) if rc else None, "seconds": float(secs),
                       "limit_s": int(limit), "log": log, "tail": tail})


def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        return {"error": f"{name} is not valid JSON: {e}"}


def git(*args):
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


gpu = "no GPU"
try:
    import torch

    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    versions = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
except ImportError:
    versions = {}
report = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": gpu,
    "versions": versions,
    "commit": git("rev-parse", "HEAD") or os.environ.get("GIT_COMMIT", ""),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "budget_s": budget,
    "passed": all(s["status"] == "pass" for s in stages if s["status"] != "skipped"),
    "stages": stages,
    "check": load("check.json"),
    "bench": load("bench.json"),
}
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)

md = [f"# lookahead_fused GPU report: {gpu}", "",
      f"{report['date']}, commit {report['commit'] or '?'}{' (with local changes)' if report['dirty'] else ''}, "
      f"torch {versions.get('torch', '?')} (CUDA {versions.get('torch_cuda', '?')}), budget {budget} s", "",
      "| stage | result | time (s) | limit (s) | log |", "| --- | --- | ---: | ---: | --- |"]
for s in stages:
    rc = "" if s["rc"] in (0, None) else " (rc %d)" % s["rc"]
    md.append(f"| {s['stage']} | {s['status']}{rc} | {s['seconds']:.1f} | {s['limit_s']} | {s['log']} |")
check = report["check"]
if isinstance(check, dict) and "rows" in check:
    md += ["", f"## check ({check['variants']} variants x GradScaler off/on; complete: {check['complete']})", "",
           "| backend | dtype | passed | max abs err | worst case |", "| --- | --- | ---: | ---: | --- |"]
    md += [f"| {r['backend']} | {r['dtype']} | {r['passed']}/{r['total']} | {r['max_abs']:.3g} | {r['worst']} |"
           for r in check["rows"]]
    for r in check["rows"]:
        for failure in r["failures"][:10]:
            md.append(f"- FAILED {r['backend']} {r['dtype']}: {failure}")
for s in stages:
    md += ["", f"## {s['stage']}: {s['status']}", "", "```", s["tail"], "```"]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print(f"report: {os.path.join(out, 'report.md')}, {os.path.join(out, 'report.json')}")
sys.exit(0 if report["passed"] else 1)
EOF
