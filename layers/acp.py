"""Adaptive Channel Partition (ACP): the SRB's channel scoring and its split between the CNN and the SSM branch.

``ChannelScore`` is the scoring part, with the released code's parameter names (its "ChannelAttentionBlock"); the
partition around it is ``AdaptiveChannelPartition``.
"""

import torch
import torch.nn as nn
from compressai.layers import conv1x1, conv3x3

ACP_MODES = ("adaptive", "static", "none")


class ChannelScore(nn.Module):
    """Local refinement and squeeze-excitation channel score (the released code's channel attention block).

    ``x' = x + net(x)`` with net = conv3x3(C, C/2) -> GELU -> conv3x3(C/2, C); ``s = channelattention(x')`` with
    channelattention = avgpool -> conv1x1(C, C/2) -> ReLU -> conv1x1(C/2, C) -> sigmoid; ``forward`` gives ``x' * s``.
    ``refine=False`` drops the local refinement (``x' = x``, no ``net``): the score alone, squeeze-excitation style.
    Input and output (B, C, H, W); ``s`` is (B, C, 1, 1), one score per image and channel.
    """

    def __init__(self, channels, refine=True):
        super().__init__()
        hidden = channels // 2
        self.net = nn.Sequential(conv3x3(channels, hidden), nn.GELU(), conv3x3(hidden, channels)) if refine else None
        self.channelattention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv1x1(channels, hidden), nn.ReLU(inplace=True), conv1x1(hidden, channels),
            nn.Sigmoid(),
        )

    def refine(self, x):
        """``x' = x + net(x)`` (``x`` itself without refinement): (B, C, H, W)."""
        return x if self.net is None else self.net(x).add_(x)

    def scores(self, x_refined):
        """``s``: (B, C, 1, 1) in (0, 1)."""
        return self.channelattention(x_refined)

    def forward(self, x):
        x = self.refine(x)
        return x * self.scores(x)


class AdaptiveChannelPartition(nn.Module):
    """Score, mix and split the channels of a (B, C, H, W) map between the CNN and the SSM branch.

    ``x'' = ChannelScore(x)`` (skipped in mode ``none``), ``mixed = conv1x1(x'')``, then ``C_local = round(ratio * C)``
    channels of ``mixed`` go to the CNN branch and the other ``C - C_local`` to the SSM branch:

    - ``adaptive``: per image, the channels with the ``C_local`` highest scores ``s`` (descending, ties to the lower
      channel index) go to the CNN branch; each branch keeps its channels in ascending index order.
    - ``static``: the same scoring, then a fixed split: the first ``C_local`` channels / the rest (the released code).
    - ``none``: no refinement and no score, the 1x1 mix and the fixed split (ablation).

    ``refine=False`` keeps the score but drops its local refinement (``ChannelScore``), for lighter variants.

    The ranking itself is discrete; the scorer learns through ``x' * s``. ``forward`` returns
    ``(x_local (B, C_local, H, W), x_ssm (B, C - C_local, H, W), routing)``; ``merge`` puts the branch outputs back at
    their channels' original positions.
    """

    def __init__(self, channels, ratio=0.5, mode="adaptive", refine=True):
        super().__init__()
        if mode not in ACP_MODES:
            raise ValueError(f"ACP mode must be one of {ACP_MODES}; got {mode!r}")
        local_channels = round(ratio * channels)
        if not 0 < local_channels < channels:
            raise ValueError(f"ratio {ratio} leaves a branch empty at {channels} channels")
        self.mode = mode
        self.channels = channels
        self.local_channels = local_channels
        self.score = ChannelScore(channels, refine) if mode != "none" else None
        self.mix = conv1x1(channels, channels)

    def scored(self, x):
        """The refined map ``x'`` (B, C, H, W), before the score is applied, and the scores ``s`` (B, C); in mode
        ``none``, ``x`` itself and None."""
        if self.score is None:
            return x, None
        x = self.score.refine(x)
        return x, self.score.scores(x).flatten(1)

    def features(self, x):
        """The mixed map (B, C, H, W) and the channel scores (B, C), or None in mode ``none``."""
        x, s = self.scored(x)
        return self.mix(x if s is None else x * s[:, :, None, None]), s

    def order(self, scores):
        """The (B, C) channel order of ``route`` in mode ``adaptive``; None (the fixed split) otherwise."""
        return self.route(scores) if self.mode == "adaptive" else None

    def folded_mix(self, scores, order):
        """The 1x1 mix of one image with its score and routing folded in: ``(weight (C, C), bias (C,))`` whose first
        ``C_local`` rows give ``forward``'s ``x_local`` from the refined map ``x'`` and the others its ``x_ssm``
        (``mix(x' * s)`` with its output channels put in ``order``). ``scores``: (C,) or None; ``order``: (C,) or
        None."""
        weight, bias = self.mix.weight.flatten(1), self.mix.bias
        if scores is not None:
            weight = weight * scores[None, :]
        if order is not None:
            weight, bias = weight[order], bias[order]
        return weight, bias

    def batched_mix(self, scores, batch):
        """``folded_mix`` for a batch of ``batch`` images: ``(weight (B, C, C), bias (B, C))`` per image, the score
        (B, C) or None applied to the columns and the rows in each image's ``order`` (the CNN branch's first);
        differentiable in the scores and the mix."""
        weight = self.mix.weight.flatten(1)
        weight = weight.expand(batch, -1, -1) if scores is None else weight * scores[:, None, :]
        bias = self.mix.bias.expand(batch, -1)
        order = self.order(scores)
        if order is not None:
            weight = weight.gather(1, order[:, :, None].expand(-1, -1, self.channels))
            bias = bias.gather(1, order)
        return weight, bias

    def route(self, scores):
        """The per-image channel order: (B, C) long, the CNN branch's channels first, each part ascending."""
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
        local = ranked[:, : self.local_channels].sort(dim=1).values
        ssm = ranked[:, self.local_channels :].sort(dim=1).values
        return torch.cat((local, ssm), dim=1)

    def forward(self, x):
        """x: (B, C, H, W) -> (x_local, x_ssm, routing); routing is the (B, C) order of ``route``, or None (fixed)."""
        mixed, scores = self.features(x)
        routing = self.order(scores)
        if routing is not None:
            mixed = _select_channels(mixed, routing)
        x_local, x_ssm = mixed.split((self.local_channels, self.channels - self.local_channels), dim=1)
        return x_local, x_ssm, routing

    def merge(self, y_local, y_ssm, routing):
        """Concatenate the branch outputs and put every channel back at its original index: (B, C, H, W)."""
        y = torch.cat((y_local, y_ssm), dim=1)
        if routing is None:
            return y
        return _select_channels(y, routing.argsort(dim=1))


def _select_channels(x, order):
    """``x[b, order[b]]`` for every image b: (B, C, H, W) with (B, C) indices. Whole channel planes are copied
    (index_select per image), which is several times faster than ``gather`` with an index the size of ``x``."""
    if x.shape[0] == 1:
        return x[0].index_select(0, order[0]).unsqueeze(0)
    return torch.stack([image.index_select(0, idx) for image, idx in zip(x, order)])
