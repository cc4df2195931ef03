#!/usr/bin/env bash
# Training speed on a GPU machine in one command, old and new code side by side (scripts/device_run.md says how to
# launch it). Everything goes to $OUT/gpu_train_speed.json (else results/), the console to gpu_train_speed.log.
#   bash scripts/gpu_train_speed.sh --prepare REV    here, before the device call: the baseline checkout of REV in
#                                                   .baseline/, BSDS500 in .gpu_data/, third_party/ (all ignored)
#   bash scripts/gpu_train_speed.sh [gpu_train_speed.py options]    on the GPU machine
# GPU_TRAIN_SPEED_TIMEOUT (s, default 560) bounds the whole run; the script starts no stage after --budget-s.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if [ "${1:-}" = "--prepare" ]; then
    rev="${2:?usage: gpu_train_speed.sh --prepare REV (the commit to compare with)}"
    set -e
    rm -rf .baseline && mkdir .baseline
    # the code only: the bundled checkpoints stay behind (the tree that travels is limited to 64 MiB)
    git archive --format=tar "$rev" | tar -x -C .baseline --exclude='checkpoints/*.pth.tar'
    mkdir -p .gpu_data/bsds500
    for split in train val; do
        [ -d .gpu_data/bsds500/$split ] || cp -r ../shared/data/bsds500/$split .gpu_data/bsds500/
    done
    bash scripts/fetch_gpu_deps.sh
    du -sh .baseline .gpu_data third_party
    echo "carry: [\".baseline\", \".gpu_data\", \"third_party\"]"
    exit 0
fi

OUTDIR="${OUT:-$REPO/results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
LIMIT="${GPU_TRAIN_SPEED_TIMEOUT:-560}"
nvidia-smi -L 2>/dev/null || echo "gpu_train_speed.sh: nvidia-smi not available"
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" scripts/gpu_train_speed.py \
    --output "$OUTDIR/gpu_train_speed.json" "$@" 2>&1 | tee "$OUTDIR/gpu_train_speed_console.log"
exit "${PIPESTATUS[0]}"
