"""Pure-PyTorch selective scan for any device: time-blocked, memory-bounded, hand-written backward.

States are only ever held for one block of ``block_len`` time steps; the backward recomputes them from the
state saved at the start of each block (one (batch, K*D, N) checkpoint per block).
"""

import torch
import torch.nn.functional as F

BLOCK_LEN = 512  # time steps whose states are materialised at once
CHUNK_LEN = 32  # inner chunk: sequential within, parallel across chunks


def linear_scan(a, b, h0):
    """h_t = a_t * h_{t-1} + b_t along the last dim, starting from h0.

    a, b: (..., T); h0: (...) -> h: (..., T). Sequential over CHUNK_LEN steps inside chunks (all chunks at
    once), then over the chunk carries, so a block costs about CHUNK_LEN + T / CHUNK_LEN tensor steps.
    """
    length = a.shape[-1]
    chunk = min(CHUNK_LEN, length)
    pad = (-length) % chunk
    if pad:  # a = 1, b = 0 leaves the state unchanged
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad), value=0.0)
    n_chunks = a.shape[-1] // chunk
    a = a.reshape(*a.shape[:-1], n_chunks, chunk)
    b = b.reshape(*b.shape[:-1], n_chunks, chunk)
    local = torch.empty_like(b)
    acc = b[..., 0]
    local[..., 0] = acc
    for j in range(1, chunk):
        acc = a[..., j] * acc + b[..., j]
        local[..., j] = acc
    decay = torch.cumprod(a, dim=-1)  # product of a from the chunk start up to j
    carries = []
    carry = h0
    for i in range(n_chunks):
        carries.append(carry)
        carry = decay[..., i, -1] * carry + local[..., i, -1]
    carry_in = torch.stack(carries, dim=-1)  # state entering each chunk
    h = local + decay * carry_in[..., None]
    return h.reshape(*h.shape[:-2], -1)[..., :length]


def _block_inputs(u, delta, A, B, delta_bias, softplus, start, end):
    """dt, a = exp(dt*A) and b = dt*B*u for time steps [start, end); shapes (batch, K*D[, N], T)."""
    x = delta[..., start:end]
    if delta_bias is not None:
        x = x + delta_bias[None, :, None]
    dt = F.softplus(x) if softplus else x
    a = torch.exp(dt[:, :, None, :] * A[None, :, :, None])
    Bx = _expand_groups(B[..., start:end], u.shape[1])
    b = (dt * u[..., start:end])[:, :, None, :] * Bx
    return x, dt, a, Bx, b


def _expand_groups(B, channels):
    """(batch, K, N, T) -> (batch, K*D, N, T): each direction's B for its D channels."""
    batch, groups, n, t = B.shape
    return B[:, :, None].expand(batch, groups, channels // groups, n, t).reshape(batch, channels, n, t)


def _sum_groups(x, groups):
    """(batch, K*D, N, T) -> (batch, K, N, T): sum over the channels of each direction."""
    batch, channels, n, t = x.shape
    return x.view(batch, groups, channels // groups, n, t).sum(2)


class SelectiveScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus):
        batch, channels, length = u.shape
        y = torch.empty_like(u)
        h = u.new_zeros(batch, channels, A.shape[1])
        checkpoints = []
        for start in range(0, length, BLOCK_LEN):
            end = min(start + BLOCK_LEN, length)
            _, _, a, _, b = _block_inputs(u, delta, A, B, delta_bias, softplus, start, end)
            hs = linear_scan(a, b, h)
            Cx = _expand_groups(C[..., start:end], channels)
            y[..., start:end] = (hs * Cx).sum(2)
            checkpoints.append(h)
            h = hs[..., -1]
        if D is not None:
            y = y + D[None, :, None] * u
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, torch.stack(checkpoints))
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
        gy = gy.contiguous().float()
        batch, channels, length = u.shape
        groups = B.shape[1]
        gu = torch.empty_like(u)
        gdelta = torch.empty_like(delta)
        gA = torch.zeros_like(A)
        gB = torch.empty_like(B)
        gC = torch.empty_like(C)
        carry = u.new_zeros(batch, channels, A.shape[1])  # a_{end} * dL/dh_{end} from the block after
        starts = list(range(0, length, BLOCK_LEN))
        for index in reversed(range(len(starts))):
            start = starts[index]
            end = min(start + BLOCK_LEN, length)
            x, dt, a, Bx, b = _block_inputs(u, delta, A, B, delta_bias, ctx.softplus, start, end)
            h0 = checkpoints[index]
            hs = linear_scan(a, b, h0)
            gy_blk = gy[..., start:end]
            Cx = _expand_groups(C[..., start:end], channels)
            r = Cx * gy_blk[:, :, None, :]
            # dL/dh_t = C_t gy_t + a_{t+1} dL/dh_{t+1}: a reversed scan with the coefficients shifted by one
            a_next = torch.cat([a[..., 1:], torch.ones_like(a[..., :1])], dim=-1)
            gh = linear_scan(a_next.flip(-1), r.flip(-1), carry).flip(-1)
            carry = a[..., 0] * gh[..., 0]
            h_prev = torch.cat([h0[..., None], hs[..., :-1]], dim=-1)
            g_logdecay = gh * h_prev * a  # dL/d(dt*A)
            gC[..., start:end] = _sum_groups(hs * gy_blk[:, :, None, :], groups)
            gB[..., start:end] = _sum_groups(gh * (dt * u[..., start:end])[:, :, None, :], groups)
            ghB = (gh * Bx).sum(2)
            gdt = (g_logdecay * A[None, :, :, None]).sum(2) + ghB * u[..., start:end]
            gA += (g_logdecay * dt[:, :, None, :]).sum((0, 3))
            gu[..., start:end] = ghB * dt
            gdelta[..., start:end] = gdt * torch.sigmoid(x) if ctx.softplus else gdt
        gD = None
        if D is not None:
            gu += D[None, :, None] * gy
            gD = (gy * u).sum((0, 2))
        g_bias = gdelta.sum((0, 2)) if delta_bias is not None else None
        return gu, gdelta, gA, gB, gC, gD, g_bias, None


def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Float32 inputs as validated by ``layers.scan.selective_scan``; returns y (batch, K*D, L)."""
    return SelectiveScanTorch.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
