#!/usr/bin/env bash
# Train on a GPU machine for a stated time, export and evaluate, in one command (scripts/gpu_train.py says what it
# does; scripts/device_run.md how to launch it). Outputs go to $OUT (else results/gpu_train/), the console to
# gpu_train_console.log there.
#   bash scripts/gpu_train.sh --prepare            here, before the device call: BSDS500 train/ val/ and Kodak in
#                                                  .gpu_data/, third_party/ (git-ignored, carried)
#   bash scripts/gpu_train.sh [gpu_train.py options]    on the GPU machine
# GPU_TRAIN_TIMEOUT (s, default 570) bounds the whole run; gpu_train.py fits its stages into --deadline-s.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .gpu_data/bsds500
    for split in train val; do
        [ -d .gpu_data/bsds500/$split ] || cp -r ../shared/data/bsds500/$split .gpu_data/bsds500/
    done
    [ -d .gpu_data/kodak ] || cp -r ../shared/data/kodak .gpu_data/
    bash scripts/fetch_gpu_deps.sh
    du -sh .gpu_data third_party
    echo "carry: [\".gpu_data\", \"third_party\"]"
    exit 0
fi

OUTDIR="${OUT:-$REPO/results/gpu_train}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
LIMIT="${GPU_TRAIN_TIMEOUT:-570}"
nvidia-smi -L 2>/dev/null || echo "gpu_train.sh: nvidia-smi not available"
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" scripts/gpu_train.py --out "$OUTDIR" "$@" 2>&1 \
    | tee "$OUTDIR/gpu_train_console.log"
exit "${PIPESTATUS[0]}"
