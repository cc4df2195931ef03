"""Reference selective scan: the plain recurrence in float64, written for clarity (tests only)."""

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Mamba's selective scan, one time step at a time, in float64.

    Args:
        u, delta: (batch, K*D, L)
        A: (K*D, N)
        B, C: (batch, K, N, L), one group of channels per scan direction
        D, delta_bias: (K*D,) or None
    Returns:
        y: (batch, K*D, L) in float64; autograd flows to every input.
    """
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, channels, length = u.shape
    groups = B.shape[1]
    per_group = channels // groups
    if delta_bias is not None:
        delta = delta + delta_bias.double()[None, :, None]
    dt = F.softplus(delta) if delta_softplus else delta
    Bx = B.repeat_interleave(per_group, dim=1)  # (batch, K*D, N, L)
    Cx = C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A) * h + dt_t * Bx[:, :, :, t] * u[:, :, t, None]
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[None, :, None] * u
    return y
