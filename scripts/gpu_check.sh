#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine without internet (scripts/device_run.md says how to launch it):
# builds mamba-ssm's selective_scan_cuda for the local GPU only, installs compressai from third_party/ into /tmp,
# checks the 'cuda' scan backend against 'torch' and 'cpu', and times csm / tcm. Everything is in
# $OUT/gpu_check.json (else results/gpu_check.json), the console output in gpu_check.log beside it.
#   bash scripts/gpu_check.sh [gpu_check.py options]     e.g. --stages build,equivalence
# Needs third_party/ from scripts/fetch_gpu_deps.sh. GPU_CHECK_TIMEOUT (s, default 450) bounds the whole run;
# scripts/gpu_check.py stops starting new measurements after --budget-s (default 360) and rewrites the JSON after
# every stage, so a timeout still leaves the figures so far.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
OUTDIR="${OUT:-$REPO/results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
LIMIT="${GPU_CHECK_TIMEOUT:-450}"

[ -d third_party ] || echo "gpu_check.sh: no third_party/ here: run scripts/fetch_gpu_deps.sh and carry third_party" >&2
echo "gpu_check.sh: $("$PY" --version 2>&1), MAX_JOBS=$MAX_JOBS, limit ${LIMIT} s, output $OUTDIR"
nvidia-smi -L 2>/dev/null || echo "gpu_check.sh: nvidia-smi not available"

timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" scripts/gpu_check.py --output "$OUTDIR/gpu_check.json" "$@" \
    2>&1 | tee "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ]; then
    echo "gpu_check.sh: stopped after ${LIMIT} s; $OUTDIR/gpu_check.json holds the stages that finished"
fi
exit "$rc"
