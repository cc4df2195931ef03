"""VMamba's 2-D selective scan: cross-scan / cross-merge, SS2D and the VSS block.

Parameter names follow VMamba (``in_proj``, ``conv2d``, ``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``,
``A_logs``, ``Ds``, ``out_norm``, ``out_proj``) so the released CSM checkpoints' SS2D weights map one to one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inference import ROWS_PER_STEP, add_mlp_rows, cpu_inference, linear_rows
from .scan import resolve_backend, selective_scan

SCAN_DIRECTIONS = (1, 2, 4)


def cross_scan(x, directions=4):
    """Unfold a feature map into ``directions`` sequences.

    x: (B, C, H, W) -> (B, K, C, H*W). K = 1: row-major; K = 2: row-major and column-major; K = 4: those two and
    both reversed (VMamba's order).
    """
    if directions not in SCAN_DIRECTIONS:
        raise ValueError(f"scan directions must be one of {SCAN_DIRECTIONS}; got {directions}")
    rows = x.flatten(2)
    if directions == 1:
        return rows[:, None]
    cols = x.transpose(2, 3).flatten(2)
    both = torch.stack([rows, cols], dim=1)
    if directions == 2:
        return both
    return torch.cat([both, both.flip(-1)], dim=1)


def cross_merge(y, height, width):
    """Sum the directions' sequences back onto the map: the adjoint of ``cross_scan``.

    y: (B, K, C, H*W) -> (B, C, H, W).
    """
    batch, directions, channels, _ = y.shape
    if directions not in SCAN_DIRECTIONS:
        raise ValueError(f"scan directions must be one of {SCAN_DIRECTIONS}; got {directions}")
    if directions == 4:
        y = y[:, :2] + y[:, 2:].flip(-1)
    out = y[:, 0].view(batch, channels, height, width)
    if directions > 1:
        out = out + y[:, 1].view(batch, channels, width, height).transpose(2, 3)
    return out


def _dt_bias_init(size, dt_min, dt_max, dt_floor):
    """Mamba's dt init: softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


class SS2D(nn.Module):
    """2-D selective scan over K directions (VMamba, forward type "v2").

    in_proj (C -> 2*d_inner, no bias) -> x, z; z = SiLU(z); depthwise conv3x3 + SiLU on x; cross-scan; per
    direction x_proj -> (dt, B, C), dt_proj; selective scan; cross-merge; LayerNorm(d_inner); * z; out_proj.

    Input and output: (B, H, W, C), channels last.

    ``use_fused_kernel`` (class attribute, True): float32 CPU inference runs ``fused_scan``; False keeps every call
    on ``scan`` (e.g. to count its operations).
    """

    use_fused_kernel = True

    def __init__(
        self,
        d_model,
        d_state=16,
        ssm_ratio=2.0,
        dt_rank="auto",
        d_conv=3,
        scan_directions=4,
        dt_min=1e-3,
        dt_max=0.1,
        dt_init_floor=1e-4,
        scan_backend="auto",
    ):
        super().__init__()
        if scan_directions not in SCAN_DIRECTIONS:
            raise ValueError(f"scan_directions must be one of {SCAN_DIRECTIONS}; got {scan_directions}")
        d_inner = int(ssm_ratio * d_model)
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k = scan_directions
        self.d_inner, self.d_state, self.dt_rank, self.directions = d_inner, d_state, rank, k
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        bound = d_inner**-0.5  # nn.Linear's default init for x_proj
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        bound = rank**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank).uniform_(-bound, bound))
        self.dt_projs_bias = nn.Parameter(_dt_bias_init((k, d_inner), dt_min, dt_max, dt_init_floor))
        # S4D-real init: A[d, n] = -(n + 1)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def scan(self, x):
        """The 2-D selective scan of a (B, d_inner, H, W) map; returns (B, d_inner, H, W)."""
        batch, _, height, width = x.shape
        length = height * width
        xs = cross_scan(x, self.directions)  # (B, K, d_inner, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan(
            xs.reshape(batch, -1, length),
            dts.reshape(batch, -1, length),
            -torch.exp(self.A_logs.float()),
            Bs,
            Cs,
            self.Ds.float(),
            self.dt_projs_bias.float().view(-1),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return cross_merge(ys.view(batch, self.directions, self.d_inner, length), height, width)

    def _kernel_applies(self, x):
        """Whether the C++ kernel runs the whole 2-D scan (``fused_scan``): a CPU input with the cpu backend, in float32
        or (under autocast) bfloat16; off with ``use_fused_kernel = False``."""
        if not self.use_fused_kernel or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return False
        return resolve_backend(x.device, self.scan_backend) == "cpu"

    def _x_dbl_and_dt(self):
        """``x_proj`` of every direction as one (K * (R + 2N), d_inner) matrix, and the kernel's float32 parameters:
        ``(dt_projs_weight, A, D, delta_bias)``."""
        params = (self.dt_projs_weight, -torch.exp(self.A_logs.float()), self.Ds, self.dt_projs_bias.reshape(-1))
        return self.x_proj_weight.reshape(-1, self.d_inner), params

    def fused_scan(self, x):
        """``scan`` in one call of the CPU kernel, channels last: (B, d_inner, H, W) (best in channels_last memory
        format) -> (B, H, W, d_inner). ``x_proj`` of every direction is one product over the pixels; the kernel picks
        each step's row of it, reads u from the map in each direction's order, forms dt from the low-rank projection
        and adds every direction's y back at its pixels, so the four direction copies of u, dt, B, C and y that
        ``cross_scan`` / ``cross_merge`` make are never built, in the forward or in the backward. Same function as
        ``scan``, float32 rounding aside. Inference (no gradient, no autocast) runs the kernel directly, ``x_proj``
        by rows (``linear_rows``); otherwise it runs with autograd (``layers.scan.cpu.ss2d_scan_cpu``)."""
        from .scan import cpu

        batch, _, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, self.d_inner)
        x_proj, params = self._x_dbl_and_dt()
        if x.dtype == torch.float32 and cpu_inference(x, self):
            pixels = pixels.contiguous()
            x_dbl = linear_rows(pixels, x_proj)  # (B, L, K * (R + 2N))
            params = [p.float().contiguous() for p in params]
            y = cpu.load_extension().ss2d_forward(pixels, x_dbl, *params, True, height, width, False)[0]
        else:  # x_proj in float32 too: the kernel scans in float32, so a bfloat16 product would only add casts
            pixels = pixels.float()
            with torch.autocast("cpu", enabled=False):
                x_dbl = F.linear(pixels, x_proj.float())
            y = cpu.ss2d_scan_cpu(pixels, x_dbl, *params, height, width)
        return y.view(batch, height, width, self.d_inner)

    def forward(self, x):
        """(B, H, W, d_model) -> (B, H, W, d_model)."""
        if self._kernel_applies(x):
            if x.dtype == torch.float32 and cpu_inference(x, self):
                return self._forward_fused(x)
            return self._forward_kernel(x)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.scan(F.silu(self.conv2d(x.permute(0, 3, 1, 2)))).to(z.dtype).permute(0, 2, 3, 1)
        return self.out_proj(self.out_norm(y) * F.silu(z))

    def _forward_kernel(self, x):
        """``forward`` with the scan in the C++ kernel and autograd (training on the CPU), channels last throughout:
        the in-projection's x half is made contiguous so that the depthwise convolution runs in channels_last and its
        output's pixels are the kernel's rows without a copy."""
        x_half, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(x_half.contiguous().permute(0, 3, 1, 2)))
        y = self.fused_scan(u).to(z.dtype)
        return self.out_proj(self.out_norm(y) * F.silu(z))

    def _forward_fused(self, x):
        """``forward`` for CPU inference with the fused scan kernel, channels last throughout (no layout copies): the
        in-projection's x half (``linear_rows``), then the scan; the gate half, the norm, the gate and the
        out-projection ``ROWS_PER_STEP`` pixels at a time (``_gate_rows``)."""
        u = linear_rows(x, self.in_proj.weight[: self.d_inner]).permute(0, 3, 1, 2)  # (B, d_inner, H, W), channels_last
        y = self.fused_scan(F.silu(self.conv2d(u), inplace=True))
        return self._gate_rows(x, y)

    def _gate_rows(self, x, y, rows=ROWS_PER_STEP):
        """``out_proj(out_norm(y) * SiLU(z))`` with ``z`` the in-projection's gate half of ``x``, ``rows`` pixels at
        a time, so that neither ``z`` nor the normed ``y`` is ever held for the whole map (each 100 MB at a 768x512
        image's first stage): x (B, H, W, d_model), y (B, H, W, d_inner), both contiguous."""
        x_rows, y_rows = x.reshape(-1, x.shape[-1]), y.view(-1, self.d_inner)
        gate_weight, out_weight = self.in_proj.weight[self.d_inner :].t(), self.out_proj.weight.t()
        out = torch.empty(x_rows.shape[0], out_weight.shape[1], dtype=y.dtype)
        z = torch.empty(min(rows, x_rows.shape[0]), self.d_inner, dtype=y.dtype)
        for start in range(0, x_rows.shape[0], rows):
            stop = min(start + rows, x_rows.shape[0])
            gate = F.silu(torch.mm(x_rows[start:stop], gate_weight, out=z[: stop - start]), inplace=True)
            normed = self.out_norm(y_rows[start:stop]).mul_(gate)
            torch.mm(normed, out_weight, out=out[start:stop])
        return out.view(*x.shape[:-1], out_weight.shape[1])


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with p = 0)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on channels-last input."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """VMamba's visual state-space block on a (B, C, H, W) map.

    ``u = u + DropPath(SS2D(LN(u)))``, then, when ``mlp_ratio > 0``, ``u = u + DropPath(MLP(LN(u)))`` (GELU).
    ``mlp_ratio=0`` gives the released CSM code's block (no MLP).
    """

    def __init__(
        self,
        hidden_dim,
        d_state=16,
        ssm_ratio=2.0,
        dt_rank="auto",
        d_conv=3,
        mlp_ratio=4.0,
        drop_path=0.0,
        scan_directions=4,
        scan_backend="auto",
    ):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = SS2D(hidden_dim, d_state, ssm_ratio, dt_rank, d_conv, scan_directions, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path)
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio))
        else:
            self.norm2 = self.mlp = None

    def forward(self, x):
        return self.forward_rows(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def forward_rows(self, x):
        """The block on channels-last input (B, H, W, C) -> (B, H, W, C)."""
        x = self.drop_path(self.op(self.norm(x))).add_(x)
        if self.mlp is None:
            return x
        if not self.training and cpu_inference(x, self):  # the MLP a block of pixels at a time (add_mlp_rows)
            return add_mlp_rows(x.contiguous(), self.norm2, self.mlp.fc1, self.mlp.act, self.mlp.fc2)
        return self.drop_path(self.mlp(self.norm2(x))).add_(x)
