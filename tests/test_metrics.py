"""utils/metrics.py: known values of each distortion and rate measure."""

import math

import numpy as np
import pytest
import torch

from utils.metrics import (bpp_from_likelihoods, bpp_from_strings, ms_ssim, ms_ssim_db, mse, psnr, psnr_8bit)


def test_mse_and_psnr_per_image_known_values():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    torch.testing.assert_close(mse(a, b), torch.tensor([0.01, 1e-4], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 40.0], dtype=torch.float64), rtol=0, atol=1e-5)
    assert psnr(a, b).dtype == torch.float64


def test_psnr_data_range_and_identical_images():
    a = torch.zeros(1, 1, 4, 4)
    assert psnr(a, a + 25.5, data_range=255.0).item() == pytest.approx(20.0)
    assert psnr(a, a).item() == math.inf


def test_psnr_8bit_matches_compressai_definition():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=generator)
    x_hat = (x + 0.02 * torch.randn(2, 3, 16, 16, generator=generator)).clamp(-0.1, 1.1)
    # CompressAI's eval: both images as (x * 255).clamp(0, 255).round(), then 20 log10(255) - 10 log10(mse).
    org = (x.double() * 255).clamp(0, 255).round()
    rec = (x_hat.double() * 255).clamp(0, 255).round()
    expected = 20 * math.log10(255) - 10 * torch.log10(((org - rec) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(psnr_8bit(x, x_hat), expected, rtol=0, atol=1e-9)
    assert abs(psnr_8bit(x, x_hat)[0] - psnr(x, x_hat)[0]) > 1e-3  # the rounding is really applied


def test_psnr_8bit_ignores_differences_within_one_level():
    x = torch.full((1, 3, 4, 4), 100 / 255)
    assert psnr_8bit(x, x + 0.4 / 255).item() == math.inf


def test_ms_ssim_identical_and_degrading():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 192, 192, generator=generator)
    noise = torch.randn(1, 3, 192, 192, generator=generator)
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    values = [ms_ssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.02, 0.1, 0.3)]
    assert 1 > values[0] > values[1] > values[2] > 0


def test_ms_ssim_is_per_image():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 176, 176, generator=generator)
    x_hat = (x + 0.05 * torch.randn(2, 3, 176, 176, generator=generator)).clamp(0, 1)
    both = ms_ssim(x, x_hat)
    assert both.shape == (2,)
    torch.testing.assert_close(both, torch.cat([ms_ssim(x[:1], x_hat[:1]), ms_ssim(x[1:], x_hat[1:])]))


def test_ms_ssim_is_nan_below_161_pixels_and_defined_from_161():
    small = torch.rand(2, 3, 160, 400)
    assert torch.isnan(ms_ssim(small, small)).all() and ms_ssim(small, small).shape == (2,)
    edge = torch.rand(1, 3, 161, 161)
    assert ms_ssim(edge, edge).item() == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_db_values():
    assert ms_ssim_db(0.9) == pytest.approx(10.0)
    np.testing.assert_allclose(ms_ssim_db([0.99, 0.999]), [20.0, 30.0])
    torch.testing.assert_close(ms_ssim_db(torch.tensor([0.9, 0.99], dtype=torch.float64)),
                               torch.tensor([10.0, 20.0], dtype=torch.float64))
    assert ms_ssim_db(1.0) == math.inf


def test_bpp_from_strings_counts_nested_bytes():
    strings = [[b"abc", b"de"], [[b"f"], [b""]]]  # 6 bytes = 48 bits
    assert bpp_from_strings(strings, num_pixels=16) == 3.0
    assert bpp_from_strings([b"\x00" * 10], num_pixels=80) == 1.0
    with pytest.raises(TypeError):
        bpp_from_strings([["not bytes"]], num_pixels=1)


def test_bpp_from_likelihoods_known_value_and_gradient():
    y = torch.full((1, 2, 4, 4), 0.5, requires_grad=True)  # 32 symbols of 1 bit
    z = torch.full((1, 1, 2, 2), 0.25)  # 4 symbols of 2 bits
    bpp = bpp_from_likelihoods({"y": y, "z": z}, num_pixels=16)  # 40 bits / 16 pixels
    assert bpp.item() == pytest.approx(2.5)
    bpp.backward()
    torch.testing.assert_close(y.grad, torch.full_like(y, -1 / (0.5 * math.log(2) * 16)))


def test_mse_of_large_images_works_through_blocks_to_the_same_value():
    from utils import metrics

    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 1100, 1400, generator=generator), torch.rand(2, 3, 1100, 1400, generator=generator)
    assert a[0].numel() > metrics.BLOCK_ELEMENTS
    whole = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(metrics.mse(a, b), whole, rtol=1e-12, atol=0)
