#!/usr/bin/env bash
# Fill third_party/ (git-ignored) with what scripts/gpu_check.sh needs on a GPU machine that has no internet:
#   third_party/sdist/           mamba-ssm and compressai sdists (PyPI has no compressai wheel for Python 3.12)
#   third_party/mamba_ssm-*/     the mamba-ssm sdist unpacked (scripts/build_mamba_kernel.py reads it)
#   third_party/wheels/          pure-Python / cp312 wheels the check installs with --no-index (pytorch-msssim,
#                                which `import compressai` needs)
#   third_party/images/          kodim01.png when ../shared/data is here (the check falls back to a random image)
# Run it once on a machine with PyPI access; then carry "third_party" to the GPU machine. Idempotent.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/third_party}"
MAMBA_VERSION=2.3.2.post1
COMPRESSAI_VERSION=1.2.8
MSSSIM_VERSION=1.0.0
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

mkdir -p "$DEST/sdist" "$DEST/wheels" "$DEST/images"

# Sdists. pip prepares each one's metadata after downloading it, which runs mamba-ssm's setup.py: it imports torch
# (so no build isolation: use this environment's) and would compile CUDA code unless told to skip it.
if [ ! -f "$DEST/sdist/mamba_ssm-$MAMBA_VERSION.tar.gz" ] \
    || [ ! -f "$DEST/sdist/compressai-$COMPRESSAI_VERSION.tar.gz" ]; then
    MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
        -d "$DEST/sdist" "mamba-ssm==$MAMBA_VERSION" "compressai==$COMPRESSAI_VERSION"
fi
if [ ! -f "$DEST/mamba_ssm-$MAMBA_VERSION/setup.py" ]; then
    tar -xzf "$DEST/sdist/mamba_ssm-$MAMBA_VERSION.tar.gz" -C "$DEST"
fi

# Wheels for CPython 3.12 on x86-64 Linux (the GPU machines' Python). pytorch-msssim is pure Python.
if ! ls "$DEST/wheels"/pytorch_msssim-"$MSSSIM_VERSION"-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST/wheels" "pytorch-msssim==$MSSSIM_VERSION"
fi

# A real Kodak image for the timings when the shared data is reachable (it does not travel to the GPU machine).
KODAK="$REPO/../shared/data/kodak/kodim01.png"
if [ -f "$KODAK" ] && [ ! -f "$DEST/images/kodim01.png" ]; then
    cp "$KODAK" "$DEST/images/kodim01.png"
fi

echo "third_party ready at $DEST ($(du -sh "$DEST" | cut -f1)):"
(cd "$DEST" && find sdist wheels images -type f | sort && echo "mamba_ssm-$MAMBA_VERSION/")
