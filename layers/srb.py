"""The State-space Residual Block (SRB, the paper's figure calls it VCB) and the released code's hybrid blocks.

``StateSpaceResidualBlock`` is the paper's block: ACP -> (CNN branch | VSS branch) -> merge -> fusion -> outer skip.
``ReleasedConvVSSBlock`` and ``ReleasedConvSwinBlock`` reproduce the authors' released code, forward passes and
parameter names included, so its checkpoints load and give its outputs.
"""

import torch
import torch.nn as nn
from compressai.layers import ResidualBlock, conv1x1, conv3x3

from .acp import AdaptiveChannelPartition, ChannelScore
from .inference import conv1x1_on_parts, cpu_inference, mix_to_parts
from .ss2d import VSSBlock
from .swin import ConvTransBlock

FUSIONS = ("conv1x1", "residual")

class ConvResidualBlock(nn.Module):
    """The figure's residual conv block: ``x + conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv3x3 (x)``; (B, C, H, W).

    ``depth`` convolutions (3 in the figure), a ReLU between each two.
    """

    def __init__(self, channels, depth=3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"a residual conv block needs at least one convolution; got depth {depth}")
        layers = [conv3x3(channels, channels)]
        for _ in range(depth - 1):
            layers += [nn.ReLU(inplace=True), conv3x3(channels, channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).add_(x)


class StateSpaceResidualBlock(nn.Module):
    """State-space Residual Block on a (B, C, H, W) map; same shape out.

    ``x_local, x_ssm = ACP(x)``; the CNN branch (``ConvResidualBlock``) on ``x_local``; the VSS branch
    (``VSSBlock``) on ``x_ssm``, or with ``ssm_branch=False`` a second ``ConvResidualBlock`` (the "CNN only"
    ablation); ``y = ACP.merge(...)`` back in original channel order; ``out = x + fusion(y)`` with fusion a 1x1 conv
    (``conv1x1``, the released code's) or the figure's ``ConvResidualBlock`` (``residual``). CPU inference with the
    1x1 fusion takes ``_forward_folded``, the same function with fewer copies of the map.

    Args:
        channels: C.
        ratio: share of channels for the CNN branch, ``C_local = round(ratio * C)``.
        acp: ACP mode, ``adaptive``, ``static`` or ``none`` (see ``AdaptiveChannelPartition``).
        acp_refine: the ACP's local refinement before scoring (True in the paper's block).
        cnn_depth: convolutions of the CNN branch (3 in the figure).
        ssm_branch: VSS block on the SSM share (True) or a CNN residual block (False).
        fusion: ``conv1x1`` or ``residual``.
        scan_directions, d_state, ssm_ratio, mlp_ratio, drop_path, scan_backend: passed to ``VSSBlock``.
    """

    def __init__(
        self,
        channels,
        ratio=0.5,
        acp="adaptive",
        acp_refine=True,
        cnn_depth=3,
        ssm_branch=True,
        fusion="conv1x1",
        scan_directions=4,
        d_state=16,
        ssm_ratio=2.0,
        mlp_ratio=4.0,
        drop_path=0.0,
        scan_backend="auto",
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}; got {fusion!r}")
        self.acp = AdaptiveChannelPartition(channels, ratio, acp, refine=acp_refine)
        local_channels = self.acp.local_channels
        ssm_channels = channels - local_channels
        self.cnn_branch = ConvResidualBlock(local_channels, cnn_depth)
        if ssm_branch:
            self.ssm_branch = VSSBlock(
                ssm_channels,
                d_state=d_state,
                ssm_ratio=ssm_ratio,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path,
                scan_directions=scan_directions,
                scan_backend=scan_backend,
            )
        else:
            self.ssm_branch = ConvResidualBlock(ssm_channels, cnn_depth)
        self.fusion = conv1x1(channels, channels) if fusion == "conv1x1" else ConvResidualBlock(channels)

    def forward(self, x):
        if self._folds(x):
            if x.shape[0] == 1:
                return self._forward_folded(x)
            return torch.cat([self._forward_folded(image[None]) for image in x])
        if isinstance(self.fusion, nn.Conv2d):
            return self._forward_batched(x)
        return self.forward_unfolded(x)

    def forward_unfolded(self, x):
        """The block as the figure draws it, each step on its own map: ACP (score, mix, route), the branches, merge,
        fusion, outer skip. ``forward`` computes the same function with fewer copies (``_forward_batched``,
        ``_forward_folded``) wherever the fusion is a 1x1 convolution; tests compare them with this one."""
        x_local, x_ssm, routing = self.acp(x)
        y = self.acp.merge(self.cnn_branch(x_local), self.ssm_branch(x_ssm), routing)
        return self.fusion(y).add_(x)

    def _forward_batched(self, x):
        """``forward`` with the 1x1 fusion for a batch that may need gradients (training), or under autocast: the
        ACP's per-image score and routing are folded into per-image 1x1 mix weights and the merge into per-image
        fusion weights (batched products), so that no scaled, permuted or concatenated copy of the map is made; the
        VSS branch gets its channels as rows (channels last) from the mix and gives them to the fusion as rows,
        without layout copies. Gradients reach the scorer through the scaled weights, as through ``x' * s``."""
        batch, channels, height, width = x.shape
        local_channels = self.acp.local_channels
        refined, scores = self.acp.scored(x)
        mix_weight, mix_bias = self.acp.batched_mix(scores, batch)  # (B, C, C), (B, C): the routed rows first
        fusion_weight = self.fusion.weight.flatten(1).expand(batch, -1, -1)
        order = self.acp.order(scores)
        if order is not None:  # the fusion's columns in the order of the routed channels
            fusion_weight = fusion_weight.gather(2, order[:, None, :].expand(-1, channels, -1))
        pixels = refined.flatten(2)  # (B, C, HW)
        x_local = torch.baddbmm(mix_bias[:, :local_channels, None], mix_weight[:, :local_channels], pixels)
        y_local = self.cnn_branch(x_local.view(batch, local_channels, height, width)).flatten(2)
        fusion_bias = self.fusion.bias[None, :, None].expand(batch, -1, height * width)
        out = torch.baddbmm(fusion_bias, fusion_weight[:, :, :local_channels], y_local)
        ssm_weight, ssm_bias = mix_weight[:, local_channels:], mix_bias[:, None, local_channels:]
        if isinstance(self.ssm_branch, VSSBlock):  # channels last: (B, HW, C_ssm) rows in and out
            rows = torch.baddbmm(ssm_bias, pixels.transpose(1, 2), ssm_weight.transpose(1, 2))
            y_ssm = self.ssm_branch.forward_rows(rows.view(batch, height, width, -1)).view(batch, height * width, -1)
            out = torch.baddbmm(out, fusion_weight[:, :, local_channels:], y_ssm.transpose(1, 2))
        else:
            x_ssm = torch.baddbmm(ssm_bias.transpose(1, 2), ssm_weight, pixels)
            y_ssm = self.ssm_branch(x_ssm.view(batch, -1, height, width)).flatten(2)
            out = torch.baddbmm(out, fusion_weight[:, :, local_channels:], y_ssm)
        # The outer skip adds in x's precision (under autocast the products above run in bfloat16).
        return x + out.view(batch, channels, height, width)

    def _folds(self, x):
        """Whether ``forward`` takes the folded path: CPU inference (``cpu_inference``) with the 1x1 fusion."""
        return isinstance(self.fusion, nn.Conv2d) and cpu_inference(x, self)

    def _forward_folded(self, x):
        """``forward`` for one image (1, C, H, W) with the ACP's score and routing folded into the 1x1 mix weights
        and the merge into the fusion's, so that no scaled, permuted or concatenated copy of the map is made; the VSS
        branch gets its pixels as rows directly (no layout copies). Same function as the unfolded path, float
        rounding aside."""
        _, channels, height, width = x.shape
        acp = self.acp
        local_channels = acp.local_channels
        refined, scores = acp.scored(x)
        order = None
        if scores is not None:
            order = acp.order(scores)  # (1, C), or None for a fixed split
            order = None if order is None else order[0]
            scores = scores[0]
        mix_weight, mix_bias = acp.folded_mix(scores, order)
        pixels = refined.reshape(channels, height * width)  # (C, HW)
        if isinstance(self.ssm_branch, VSSBlock):  # the SSM share as rows = pixels, channels last, as VSS works
            x_local, rows = mix_to_parts(pixels, mix_weight, mix_bias, local_channels)
            y_ssm = self.ssm_branch.forward_rows(rows.view(1, height, width, -1)).view(height * width, -1).t()
        else:
            x_local = torch.addmm(mix_bias[:local_channels, None], mix_weight[:local_channels], pixels)
            x_ssm = torch.addmm(mix_bias[local_channels:, None], mix_weight[local_channels:], pixels)
            y_ssm = self.ssm_branch(x_ssm.view(1, -1, height, width)).view(-1, height * width)
        y_local = self.cnn_branch(x_local.view(1, local_channels, height, width))
        fusion_weight = self.fusion.weight.flatten(1)
        if order is not None:
            fusion_weight = fusion_weight[:, order]
        parts = (y_local.view(local_channels, -1), y_ssm)
        out = conv1x1_on_parts(fusion_weight, self.fusion.bias, parts, residual=x.view(channels, -1))
        return out.view(1, channels, height, width)


class ReleasedConvVSSBlock(nn.Module):
    """The released code's CNN + VSS block (stages 2-3 of ``g_a``, 1-2 of ``g_s``) on (B, C, H, W); same shape out.

    ``x = score(x)``; ``a, b = split(conv1_1(x))`` in halves; ``a = ResidualBlock(a) + a``; ``b = VSS(b)`` (no MLP,
    ssm_ratio 2, d_state 16, dt_rank auto); ``x + conv1_2(cat(a, b))``: the residual adds to the *scored* x.
    Keys: ``score.*``, ``conv1_1``, ``conv_block.conv1/conv2``, ``mambaVC_block.norm/op.*``, ``conv1_2``.
    """

    def __init__(self, channels, drop_path=0.1, scan_backend="auto"):
        super().__init__()
        half = channels // 2
        self.half = half
        self.score = ChannelScore(channels)
        self.conv1_1 = conv1x1(channels, channels)
        self.conv_block = ResidualBlock(half, half)
        self.mambaVC_block = VSSBlock(
            channels - half, d_state=16, ssm_ratio=2.0, dt_rank="auto", mlp_ratio=0, drop_path=drop_path,
            scan_backend=scan_backend,
        )
        self.conv1_2 = conv1x1(channels, channels)

    def forward(self, x):
        x = self.score(x)
        a, b = torch.split(self.conv1_1(x), (self.half, x.shape[1] - self.half), dim=1)
        a = self.conv_block(a) + a
        b = self.mambaVC_block(b)
        return x + self.conv1_2(torch.cat((a, b), dim=1))


class ReleasedConvSwinBlock(ConvTransBlock):
    """The released code's CNN + Swin block (stage 1 of ``g_a``, last stage of ``g_s``).

    On (B, C, H, W), C split in halves; same shape out. ``conv1_1`` is applied twice, a quirk of the released code
    kept so its weights give its outputs; with ``with_score`` (the first block of a pair) the channel score sits
    between the two: ``s = x``; ``x = conv1_1(x)``; [``x = score(x)``]; ``a, b = split(conv1_1(x))``; then TCM's
    branches, ``s + conv1_2(cat(a, b))``. Keys: ConvTransBlock's, plus ``score.*`` with ``with_score``.
    """

    def __init__(self, channels, head_dim, window_size, drop_path=0.0, type="W", with_score=False):
        half = channels // 2
        super().__init__(half, channels - half, head_dim, window_size, drop_path, type)
        self.score = ChannelScore(channels) if with_score else None

    def forward(self, x):
        y = self.conv1_1(x)
        if self.score is not None:
            y = self.score(y)
        return x + self.branches(self.conv1_1(y))
