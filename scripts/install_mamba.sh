#!/usr/bin/env bash
# Install mamba-ssm's compiled selective scan, which the 'cuda' scan backend (layers/scan/cuda.py) imports as
# `selective_scan_cuda`. Run it on the CUDA machine, in the environment that has this project's torch.
#
#   bash scripts/install_mamba.sh                  pip install --no-build-isolation -r requirements-cuda.txt
#                                                  (mamba-ssm + causal-conv1d; a source build compiles every GPU
#                                                  architecture from sm_75 to sm_121: 5-8 minutes on 16 cores,
#                                                  much longer on fewer, when no prebuilt wheel matches)
#   bash scripts/install_mamba.sh --arch-limited   build only selective_scan_cuda, for this machine's GPU, from the
#                                                  mamba-ssm sdist (third_party/, downloaded if absent), and copy it
#                                                  into site-packages: about a minute on 16 cores
#     --arch 90                                    another architecture than GPU 0's (no GPU needed then)
#     --sdist PATH                                 a mamba-ssm sdist, directory or .tar.gz
# PYTHON selects the interpreter (default: python3); MAX_JOBS the parallel compile jobs (default: all CPUs).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MAMBA_VERSION=2.3.2.post1
mode=pip
build_args=()

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --arch-limited) mode=arch-limited ;;
        --arch) build_args+=(--arch "$2"); shift ;;
        --sdist) build_args+=(--sdist "$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install_mamba.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ "$mode" = pip ]; then
    "$PY" -m pip install --no-build-isolation -r "$REPO/requirements-cuda.txt"
else
    sdist_given=0
    for a in "${build_args[@]+"${build_args[@]}"}"; do [ "$a" = --sdist ] && sdist_given=1; done
    if [ "$sdist_given" = 0 ] && [ ! -f "$REPO/third_party/mamba_ssm-$MAMBA_VERSION/setup.py" ] \
        && [ ! -f "$REPO/third_party/sdist/mamba_ssm-$MAMBA_VERSION.tar.gz" ]; then
        # pip prepares the sdist's metadata after the download: that runs setup.py, which imports torch (hence no
        # build isolation) and would compile CUDA code unless told to skip it.
        MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download --no-deps --no-build-isolation --no-binary :all: \
            -d "$REPO/third_party/sdist" "mamba-ssm==$MAMBA_VERSION"
    fi
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" "$REPO/scripts/build_mamba_kernel.py" --install \
        "${build_args[@]+"${build_args[@]}"}"
fi

echo
echo "Checking (the same checks by hand):"
echo "  $PY -c 'import selective_scan_cuda'"
echo "  cd $REPO && $PY -c \"from layers.scan import resolve_backend; print(resolve_backend('cuda'))\"   # prints cuda"
"$PY" -c 'import selective_scan_cuda; print("import selective_scan_cuda: ok,", selective_scan_cuda.__file__)'
(cd "$REPO" && "$PY" -c "from layers.scan import resolve_backend as r; print('auto backend on CUDA:', r('cuda'))")
