"""3x3 convolutions for CPU inference by Winograd's algorithm (NNPACK's F(6x6, 3x3)).

A 3x3 convolution with stride 1 is most of the multiply-adds of CSM and TCM alike (the SRB's ACP refinement and CNN
branch, TCM's residual units, every ``ResidualBlockUpsample``). PyTorch runs them on the CPU as direct convolutions
(oneDNN); Winograd's F(6x6, 3x3) computes the same convolution with about a fifth of the multiplications. On a
two-core machine (AVX-512) it took 35-50 % of oneDNN's time at 128-1024 channels on maps of 64x96 pixels and more,
45-70 % at 192-320 channels on 32x48; but more than oneDNN below ``MIN_PIXELS``, with fewer than ``MIN_CHANNELS``
input or output channels (1.3-2.8x at 32), and on small products of channels and pixels (``MIN_WORK``: 1.2x for
128 -> 128 channels on 32x48 pixels), where the direct convolution is kept.

``WinogradConv2d`` is a ``nn.Conv2d`` (same parameters and state-dict keys) that takes that path when it applies:
float32 CPU inference (``layers.inference.cpu_inference``), a convolution and map large enough (``MIN_PIXELS``,
``MIN_CHANNELS``, ``MIN_WORK``), NNPACK built into PyTorch and its thread pool at torch's thread count (below).
Otherwise (training, float64, CUDA, autocast, small convolutions) it is ``nn.Conv2d``.
``use_winograd(module)`` turns a module's eligible convolutions into it, in place. The results differ from the
direct convolution by float32 rounding only (about 2e-5 of the output's scale, the transforms' rounding), and are
the same from run to run.

PyTorch makes NNPACK's thread pool at its first convolution, with the thread count of that moment, and never
resizes it: after ``torch.set_num_threads`` changes the count, the Winograd path would run on the old number of
threads (measured: 128 channels on 256x384 pixels took 0.14 s on a pool of 1 thread whether torch was set to 1 or
2 threads, 0.09 s on a pool of 2). So the path is taken only while the count is the pool's, and a warning says so
once; set the thread count before the first inference.
"""

import logging

import torch
import torch.nn as nn

from .inference import cpu_inference

MIN_PIXELS = 1024  # below this (e.g. 16x24) the transforms cost more than they save
MIN_CHANNELS = 48  # input and output channels; at 32 oneDNN's direct convolution is faster on any map
MIN_WORK = 40_000_000  # in_channels * out_channels * pixels; below, the transforms' share is too large

log = logging.getLogger("csm.conv")
_pool = {"threads": None, "warned": False}  # the thread count NNPACK's pool was made with (None: not yet made)


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (3x3, stride 1, padding 1, no groups) that runs CPU inference through Winograd's algorithm.

    ``enabled`` (class attribute) switches the Winograd path off for every instance, for comparisons."""

    enabled = True

    def _conv_forward(self, input, weight, bias):
        if winograd_applies(self, input):
            if _pool["threads"] is None:  # this call makes the pool
                _pool["threads"] = torch.get_num_threads()
            return torch._nnpack_spatial_convolution(input.contiguous(), weight.contiguous(), bias, list(self.padding))
        return super()._conv_forward(input, weight, bias)


def winograd_applies(conv, input):
    """Whether the ``WinogradConv2d`` ``conv`` takes the Winograd path for this (B, C, H, W) input."""
    return (
        WinogradConv2d.enabled
        and input.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and input.dim() == 4
        and input.shape[-2] * input.shape[-1] >= MIN_PIXELS
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
        and conv.in_channels * conv.out_channels * input.shape[-2] * input.shape[-1] >= MIN_WORK
        and cpu_inference(input, conv)
        and winograd_available()
        and pool_has_current_threads()
    )


def pool_has_current_threads():
    """Whether NNPACK's thread pool is not made yet or has torch's current thread count (see the module's
    docstring); warns once when it has not."""
    threads = torch.get_num_threads()
    if _pool["threads"] in (None, threads):
        return True
    if not _pool["warned"]:
        _pool["warned"] = True
        log.warning(
            "NNPACK's thread pool was made with %d threads and torch now has %d: while the counts differ, 3x3 "
            "convolutions run as direct convolutions, without Winograd's speed-up; set torch's thread count before "
            "the first inference",
            _pool["threads"],
            threads,
        )
    return False


_AVAILABLE = None


def winograd_available():
    """Whether this PyTorch has NNPACK; the first call also initialises NNPACK, which its convolution needs."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = bool(getattr(torch, "_nnpack_available", lambda: False)()) and hasattr(
            torch, "_nnpack_spatial_convolution"
        )
    return _AVAILABLE


def eligible(conv):
    """Whether ``conv`` is a plain ``nn.Conv2d`` that the Winograd path computes exactly (3x3, stride 1, padding 1,
    no dilation or groups, zero padding)."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def use_winograd(module):
    """Turn every eligible convolution inside ``module`` into a ``WinogradConv2d``, in place (parameters, buffers and
    state-dict keys unchanged). Returns how many."""
    count = 0
    for child in module.modules():
        if eligible(child):
            child.__class__ = WinogradConv2d
            count += 1
    return count
