"""mamba-ssm's compiled CUDA selective scan, wrapped in an autograd Function.

The compiled module ``selective_scan_cuda`` is imported only when this backend is first used, never at import
time: CPU machines have no mamba-ssm, and ``import mamba_ssm`` itself fails without the compiled kernel.
"""

import importlib

import torch

INSTALL_HINT = (
    "the 'cuda' selective-scan backend needs mamba-ssm's compiled kernel 'selective_scan_cuda': on a CUDA "
    "machine run `pip install --no-build-isolation -r requirements-cuda.txt`, or `bash scripts/install_mamba.sh` "
    "for a source build limited to the local GPU"
)

_kernel = None


def load_kernel():
    """Import and return the compiled ``selective_scan_cuda`` module (raises ImportError with a how-to)."""
    global _kernel
    if _kernel is None:
        try:
            _kernel = importlib.import_module("selective_scan_cuda")
        except Exception as exc:  # ImportError, or an OSError from a CUDA library mismatch
            raise ImportError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    return _kernel


class SelectiveScanCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus):
        kernel = load_kernel()
        out, x, *_ = kernel.fwd(u, delta, A, B, C, D, None, delta_bias, softplus)
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, x)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, delta_bias, x = ctx.saved_tensors
        dout = dout.contiguous().float()
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *_ = load_kernel().bwd(
            u, delta, A, B, C, D, None, delta_bias, dout, x, None, None, ctx.softplus, False
        )
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            dD if D is not None else None,
            ddelta_bias if delta_bias is not None else None,
            None,
        )


def selective_scan_cuda(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Float32 CUDA inputs as validated by ``layers.scan.selective_scan``; returns y (batch, K*D, L)."""
    return SelectiveScanCuda.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
