"""Distortion and rate measures, each defined once and imported by training, evaluation and the codec.

Distortions are per image: BxCxHxW inputs give a length-B tensor. Rates are totals over everything passed in.
"""

import math

import numpy as np
import torch
from pytorch_msssim import ms_ssim as _pytorch_ms_ssim

from utils.image import to_uint8

# pytorch_msssim's 5-scale MS-SSIM downsamples 4 times and needs more than (win_size - 1) * 2**4 = 160 pixels.
MS_SSIM_MIN_SIDE = 161


# Above this many elements per image, mse() works through blocks of rows, so that its float64 temporaries stay
# small (a 12-megapixel image would otherwise take about 1 GB of them).
BLOCK_ELEMENTS = 1 << 22


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image of two BxCxHxW tensors, accumulated in float64: shape (B,)."""
    if a[0].numel() <= BLOCK_ELEMENTS:
        return (a.to(torch.float64) - b.to(torch.float64)).pow(2).flatten(1).mean(dim=1)
    rows = max(1, BLOCK_ELEMENTS // (a[0].numel() // a.shape[-2]))
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for top in range(0, a.shape[-2], rows):
        block = a[..., top : top + rows, :].to(torch.float64) - b[..., top : top + rows, :].to(torch.float64)
        total += block.pow_(2).flatten(1).sum(dim=1)
    return total / a[0].numel()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image of two BxCxHxW tensors (float64, shape (B,)); +inf for identical images."""
    return 10 * torch.log10(data_range**2 / mse(a, b))


def psnr_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """PSNR of each image after rounding both to the 8-bit grid, CompressAI's "psnr-rgb": shape (B,), float64.

    x, x_hat: BxCxHxW in [0, 1] (values outside are clamped, as when the reconstruction is saved as a PNG).
    """
    return psnr(to_uint8(x), to_uint8(x_hat), data_range=255.0)


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM (5 scales, Gaussian window 11, data range 1) of each image of two BxCxHxW tensors: shape (B,).

    Undefined for images with a side under 161 pixels (the fifth scale would be smaller than the window):
    returns NaN for those, without raising, so a summary over mixed-size images can skip them explicitly.
    Differentiable, so it can serve as a training loss (1 - ms_ssim).
    """
    if min(a.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return torch.full((a.shape[0],), math.nan, dtype=a.dtype, device=a.device)
    return _pytorch_ms_ssim(a, b, data_range=1.0, size_average=False)


def ms_ssim_db(v):
    """MS-SSIM on the dB scale used in plots, -10 * log10(1 - v); takes a float, array or tensor of MS-SSIM."""
    if isinstance(v, torch.Tensor):
        return -10 * torch.log10(1 - v)
    with np.errstate(divide="ignore"):  # v == 1 (identical images) maps to +inf, not a warning
        return -10 * np.log10(1 - np.asarray(v, dtype=np.float64))


def _total_bytes(strings) -> int:
    """Total length of the bytes objects in an arbitrarily nested list/tuple (CompressAI's `strings`)."""
    if isinstance(strings, (bytes, bytearray)):
        return len(strings)
    if isinstance(strings, (list, tuple)):
        return sum(_total_bytes(s) for s in strings)
    raise TypeError(f"strings must hold bytes objects, found {type(strings).__name__}")


def bpp_from_strings(strings, num_pixels: int) -> float:
    """Bits per pixel of compressed `strings` (nested lists of bytes, e.g. [y_strings, z_strings]).

    num_pixels: pixels of the images that the strings encode (H*W for one image, B*H*W for a batch).
    """
    return _total_bytes(strings) * 8 / num_pixels


def bpp_from_likelihoods(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel, sum over all likelihood tensors of -log2(p) / num_pixels: a scalar tensor.

    likelihoods: CompressAI's forward()["likelihoods"], e.g. {"y": BxMxhxw, "z": BxNxh'xw'}.
    num_pixels: B*H*W of the input batch, so the result is the mean bpp per image; differentiable (rate loss).
    """
    total_nats = sum(torch.log(l).sum() for l in likelihoods.values())
    return total_nats / (-math.log(2) * num_pixels)
