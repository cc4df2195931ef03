"""The entropy model's context-aggregation block (TCM's SWAtten) with a pluggable global branch.

Parameter names follow the released code (``conv_a``, ``conv_b``, ``non_local_block``, ``in_conv``, ``out_conv``) and
are registered in its order, so a released ``atten_mean.i.0.*`` entry maps one to one onto a ``ContextBlock``.
"""

import torch
import torch.nn as nn
from compressai.layers import conv1x1, conv3x3


class ResidualUnit(nn.Module):
    """CompressAI ``AttentionBlock``'s unit: ``relu(conv(x) + x)``.

    ``conv`` = conv1x1(N -> N/2), ReLU, conv3x3(N/2 -> N/2), ReLU, conv1x1(N/2 -> N). (B, N, H, W) -> same.
    """

    def __init__(self, N):
        super().__init__()
        self.conv = nn.Sequential(
            conv1x1(N, N // 2),
            nn.ReLU(inplace=True),
            conv3x3(N // 2, N // 2),
            nn.ReLU(inplace=True),
            conv1x1(N // 2, N),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv(x) + x)


class ContextBlock(nn.Module):
    """Context aggregation of one slice's support: an attention block whose non-local part is ``global_block``.

    ``u = in_conv(x)``; ``out = conv_a(u) * sigmoid(conv_b(non_local_block(u))) + u``; ``out_conv(out)``.
    ``conv_a`` is three residual units, ``conv_b`` three residual units and a conv1x1.

    Args:
        in_channels: channels of the support (and of the output).
        inner: channels inside the block.
        global_block: module mapping (B, inner, H, W) to the same shape (a VSS block, a Swin W+SW pair); ``None``
            gives ``nn.Identity``, i.e. the gate sees the local residual units only.

    Input and output: (B, in_channels, H, W).
    """

    def __init__(self, in_channels, inner=128, global_block=None):
        super().__init__()
        # Registration order = the released state_dict's order (conv_a, conv_b, non_local_block, in_conv, out_conv).
        self.conv_a = nn.Sequential(*(ResidualUnit(inner) for _ in range(3)))
        self.conv_b = nn.Sequential(*(ResidualUnit(inner) for _ in range(3)), conv1x1(inner, inner))
        self.non_local_block = nn.Identity() if global_block is None else global_block
        self.in_conv = conv1x1(in_channels, inner)
        self.out_conv = conv1x1(inner, in_channels)

    def forward(self, x):
        u = self.in_conv(x)
        gate = torch.sigmoid(self.conv_b(self.non_local_block(u)))
        return self.out_conv(self.conv_a(u) * gate + u)
