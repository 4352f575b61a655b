#!/bin/sh
# CMake compiler launcher for the CUDA sources: runs the compile command given after the log
# path, writes its messages (nvcc -Xptxas -v: registers and spills per kernel) to the log, and
# passes them on. Usage: ptxas_log.sh LOG COMMAND [ARGS...]
log="$1"
shift
out=$("$@" 2>&1)
status=$?
printf '%s\n' "$out" >"$log"
printf '%s\n' "$out" >&2
exit $status
