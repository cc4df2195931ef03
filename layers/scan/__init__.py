"""The selective scan of Mamba's SSM: one entry point, several backends side by side.

``selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend)`` has mamba-ssm's semantics and argument
order. Backends:

- ``ref``: float64 recurrence, for tests (``layers.scan.ref``).
- ``torch``: pure PyTorch on any device, blocked in time, hand-written backward (``layers.scan.torch_impl``).
- ``cpu``: compiled C++ loop, built at first use and cached (``layers.scan.cpu``).
- ``cuda``: mamba-ssm's compiled kernel (``layers.scan.cuda``), imported lazily.
- ``auto``: ``cuda`` for CUDA tensors when its kernel imports, else ``cpu`` for CPU tensors when it builds, else
  ``torch``. The environment variable ``CSM_SCAN_BACKEND`` forces one for every ``auto`` call.
"""

import logging
import os

import torch

from .ref import selective_scan_ref
from .torch_impl import selective_scan_torch

BACKENDS = ("auto", "ref", "torch", "cpu", "cuda")
ENV_VAR = "CSM_SCAN_BACKEND"

log = logging.getLogger("csm.scan")
_reported = set()
_unavailable = {}  # backend -> reason it could not load (auto falls back once, then remembers)


class ScanBackendError(RuntimeError):
    """A backend that was asked for explicitly cannot run here."""


def _load(backend):
    """Return the implementation function of a concrete backend, or raise ScanBackendError."""
    if backend == "ref":
        return selective_scan_ref
    if backend == "torch":
        return selective_scan_torch
    if backend == "cpu":
        from . import cpu

        try:
            cpu.load_extension()
        except Exception as exc:
            raise ScanBackendError(str(exc)) from exc
        return cpu.selective_scan_cpu
    if backend == "cuda":
        from . import cuda

        try:
            cuda.load_kernel()
        except ImportError as exc:
            raise ScanBackendError(str(exc)) from exc
        return cuda.selective_scan_cuda
    raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _try_load(backend):
    if backend in _unavailable:
        return None
    try:
        return _load(backend)
    except ScanBackendError as exc:
        _unavailable[backend] = str(exc)
        log.warning("selective scan: backend %r unavailable, falling back (%s)", backend, exc)
        return None


def resolve_backend(device, backend="auto"):
    """Name of the backend that ``selective_scan`` would run for tensors on ``device``."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda" and _try_load("cuda") is not None:
        return "cuda"
    if device.type == "cpu" and _try_load("cpu") is not None:
        return "cpu"
    return "torch"


def _check_shapes(u, delta, A, B, C, D, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, K*D, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (K*D, N) = ({channels}, N); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n or t.shape[3] != length:
            raise ValueError(f"{name} must be (batch, K, N, L) = ({batch}, K, {n}, {length}); got {tuple(t.shape)}")
        if channels % t.shape[1]:
            raise ValueError(f"{name} has {t.shape[1]} groups, which does not divide {channels} channels")
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must be (K*D,) = ({channels},); got {tuple(t.shape)}")


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto"):
    """y = selective scan of u (mamba-ssm's ``selective_scan_fn`` with z = None), computed in float32.

    Per batch b, channel d (of group g = d // (K*D / K)), state n and time t:
    ``dt = softplus(delta + delta_bias)``, ``h_t = exp(dt_t A[d,n]) h_{t-1} + dt_t B[b,g,n,t] u_t``,
    ``y_t = sum_n C[b,g,n,t] h_t[n] + D[d] u_t``.

    Args:
        u, delta: (batch, K*D, L)
        A: (K*D, N)
        B, C: (batch, K, N, L), one group per scan direction
        D, delta_bias: (K*D,) or None
        delta_softplus: apply softplus to delta + delta_bias
        backend: "auto", "ref", "torch", "cpu" or "cuda" (see the module docstring)
    Returns:
        y: (batch, K*D, L) float32 (float64 for ``ref``, and for ``torch`` given float64 u); autograd flows to
        every input.
    """
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    name = resolve_backend(u.device, backend)
    fn = _load(name)
    if name not in _reported:
        _reported.add(name)
        log.info("selective scan: using the %r backend", name)
    if name == "ref":
        return fn(u, delta, A, B, C, D, delta_bias, delta_softplus)
    # float32 everywhere, except that the dtype-generic torch backend keeps float64 inputs in float64 (the codec's
    # deterministic mode computes its entropy parameters that way).
    dtype = torch.float64 if name == "torch" and u.dtype == torch.float64 else torch.float32
    inputs = [None if t is None else t.to(dtype).contiguous() for t in (u, delta, A, B, C, D, delta_bias)]
    with torch.autocast(device_type=u.device.type, enabled=False):  # never in reduced precision
        return fn(*inputs, delta_softplus)
