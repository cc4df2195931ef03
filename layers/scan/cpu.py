"""The fast CPU selective scan: a C++ extension (csrc/selective_scan_cpu.cpp) built at first use and cached.

The build is keyed by the source, the compiler flags, the torch and Python versions and the CPU's instruction
set (it is compiled with -march=native), so a cache is never reused where it could be wrong. The first build takes
about a minute; ``BUILD_INFO`` records how long it took and whether the cache was hit.
"""

import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("csm.scan")

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
# at::parallel_for is inlined from ATen's headers and only runs in parallel when the extension itself is compiled
# with OpenMP; on Linux the extension then binds to the libgomp.so.1 that torch ships (elsewhere it runs serially).
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CFLAGS = ["-O3", "-ffast-math", "-march=native", *OPENMP]
LDFLAGS = OPENMP
BUILD_INFO = {}
_module = None


def _cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir():
    """Where built extensions live: $CSM_CACHE_DIR, else $XDG_CACHE_HOME/csm, else ~/.cache/csm."""
    root = os.environ.get("CSM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "csm"
    )
    return Path(root) / "scan_cpu"


def load_extension():
    """Build (first call) or load the compiled module; raises RuntimeError with the reason if it cannot."""
    global _module
    if _module is not None:
        return _module
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (SOURCE.read_text(), " ".join(CFLAGS + LDFLAGS), torch.__version__, sys.version, _cpu_flags())
        )
    ).hexdigest()[:16]
    name = f"csm_scan_cpu_{key}"
    build_dir = cache_dir() / name
    cached = (build_dir / f"{name}.so").exists()
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    start = time.perf_counter()
    try:
        _module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RuntimeError(
            f"could not build the CPU selective-scan extension ({first_line}); it needs a C++ compiler "
            "(e.g. `apt-get install g++` or `xcode-select --install`) and ninja (`pip install ninja`)"
        ) from exc
    seconds = time.perf_counter() - start
    BUILD_INFO.update(seconds=seconds, cached=cached, path=str(build_dir))
    if not cached:
        log.warning("selective scan: built the CPU extension in %.1f s (cached in %s)", seconds, build_dir)
    return _module


class SelectiveScanCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus):
        y, checkpoints = load_extension().forward(u, delta, A, B, C, D, delta_bias, softplus)
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, checkpoints)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
        gu, gdelta, gA, gB, gC, gD, gbias = load_extension().backward(
            u, delta, A, B, C, D, delta_bias, ctx.softplus, checkpoints, gy
        )
        return (
            gu,
            gdelta,
            gA,
            gB,
            gC,
            gD if D is not None else None,
            gbias if delta_bias is not None else None,
            None,
        )


def selective_scan_cpu(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Float32 contiguous CPU inputs as validated by ``layers.scan.selective_scan``; returns y (batch, K*D, L)."""
    return SelectiveScanCpu.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)


class SS2DScanCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dbl, dt_w, A, D, delta_bias, height, width):
        y, checkpoints = load_extension().ss2d_forward(x, x_dbl, dt_w, A, D, delta_bias, True, height, width, True)
        ctx.size = (height, width)
        ctx.save_for_backward(x, x_dbl, dt_w, A, D, delta_bias, checkpoints)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, x_dbl, dt_w, A, D, delta_bias, checkpoints = ctx.saved_tensors
        grads = load_extension().ss2d_backward(x, x_dbl, dt_w, A, D, delta_bias, True, *ctx.size, checkpoints, gy)
        return (*grads, None, None)


def ss2d_scan_cpu(x, x_dbl, dt_w, A, D, delta_bias, height, width):
    """SS2D's whole 2-D selective scan (K directions, cross-scan and cross-merge included) in the C++ kernel, with
    autograd. The map's pixels as rows, channels last: x (batch, H*W, d_inner), row-major pixels; x_dbl (batch,
    H*W, K*(R + 2N)) x_proj of every pixel, (dt_r, B, C) of direction k at columns k*(R + 2N) + ...; dt_w (K,
    d_inner, R) dt_proj's weights; A (K*d_inner, N); D, delta_bias (K*d_inner,); softplus on delta. Returns
    (batch, H*W, d_inner), the sum of the directions' outputs at their pixels. Inputs are cast to contiguous float32
    (the scan never runs in reduced precision); the backward recomputes the states from the forward's chunk
    checkpoints (as ``selective_scan_cpu``) and every input gets its gradient."""
    inputs = [t.float().contiguous() for t in (x, x_dbl, dt_w, A, D, delta_bias)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return SS2DScanCpu.apply(*inputs, height, width)
    return load_extension().ss2d_forward(*inputs, True, height, width, False)[0]  # no states to keep
