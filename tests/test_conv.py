"""Winograd 3x3 convolutions for CPU inference (layers.conv)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import conv as wconv
from layers.conv import WinogradConv2d, use_winograd, winograd_applies, winograd_available
from models import build_model

needs_nnpack = pytest.mark.skipif(not winograd_available(), reason="this PyTorch has no NNPACK")


def winograd_conv(cin, cout, bias=True):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    assert use_winograd(conv) == 1
    return conv


@pytest.fixture(autouse=True)
def fresh_pool_record(monkeypatch):
    """Each test starts as if NNPACK's pool were not made yet: an earlier test may have made it while torch ran on
    another thread count (tests of small tensors run on one), which would send the Winograd path to the direct
    convolution (test_winograd_only_at_the_pools_thread_count)."""
    monkeypatch.setattr(wconv, "_pool", {"threads": None, "warned": False})


@pytest.fixture
def nnpack_calls(monkeypatch):
    """Counts the calls of NNPACK's convolution; the size gates other than MIN_PIXELS are lowered so that small
    convolutions take the Winograd path (test_size_gates checks them)."""
    monkeypatch.setattr(wconv, "MIN_CHANNELS", 1)
    monkeypatch.setattr(wconv, "MIN_WORK", 0)
    calls = []
    real = torch._nnpack_spatial_convolution

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counted)
    return calls


@needs_nnpack
@pytest.mark.parametrize(
    "shape, cout, bias",
    [((1, 64, 40, 48), 32, True), ((2, 24, 33, 35), 40, False), ((1, 3, 64, 64), 12, True)],
)
def test_winograd_matches_direct_convolution(nnpack_calls, shape, cout, bias):
    conv = winograd_conv(shape[1], cout, bias)
    x = torch.randn(shape)
    with torch.no_grad():
        out = conv(x)
        reference = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), 1, 1)
    assert len(nnpack_calls) == 1
    assert out.dtype == torch.float32 and out.shape == reference.shape
    error = (out.double() - reference).abs().max() / reference.abs().max()
    assert error < 1e-4, error


@needs_nnpack
def test_winograd_takes_non_contiguous_input_and_repeats_exactly(nnpack_calls):
    conv = winograd_conv(32, 32)
    x = torch.randn(1, 32, 48, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first, second = conv(x), conv(x[:, :, :, :].clone())
        direct = F.conv2d(x, conv.weight, conv.bias, 1, 1)
    assert len(nnpack_calls) == 2
    assert torch.equal(first, second)
    torch.testing.assert_close(first, direct, rtol=0, atol=1e-4 * direct.abs().max().item())


@needs_nnpack
def test_winograd_only_at_the_pools_thread_count(nnpack_calls, caplog):
    """The first Winograd convolution records the thread count NNPACK's pool is made with; once torch's count
    differs, the direct convolution runs instead, with one warning."""
    conv = winograd_conv(32, 32)
    x = torch.randn(1, 32, 40, 48)
    with torch.no_grad():
        conv(x)
        assert nnpack_calls and wconv._pool["threads"] == torch.get_num_threads()
        wconv._pool["threads"] = torch.get_num_threads() + 1  # as after torch.set_num_threads changed the count
        with caplog.at_level("WARNING", logger="csm.conv"):
            outs = [conv(x), conv(x)]
        direct = F.conv2d(x, conv.weight, conv.bias, 1, 1)
        assert not winograd_applies(conv, x)
    assert len(nnpack_calls) == 1
    assert all(torch.equal(out, direct) for out in outs)
    warnings = [r for r in caplog.records if r.name == "csm.conv"]
    assert len(warnings) == 1 and "thread pool" in warnings[0].getMessage()


@pytest.mark.parametrize("case", ["grad", "float64", "small", "disabled", "autocast"])
def test_direct_convolution_where_winograd_does_not_apply(nnpack_calls, monkeypatch, case):
    conv = winograd_conv(16, 16)
    x = torch.randn(1, 16, 40, 40)
    if case == "float64":
        conv.double()
        x = x.double()
    if case == "small":
        x = x[..., :16, :16]
    if case == "disabled":
        monkeypatch.setattr(WinogradConv2d, "enabled", False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with torch.set_grad_enabled(case == "grad"), autocast:
        out = conv(x)
        direct = F.conv2d(x, conv.weight, conv.bias, 1, 1)
        assert not winograd_applies(conv, x)
    assert not nnpack_calls
    assert torch.equal(out, direct)
    if case == "grad":
        out.sum().backward()
        assert conv.weight.grad is not None


@needs_nnpack
def test_size_gates():
    """Winograd where the convolution and map are large enough, the direct convolution below any of the gates."""
    wide, narrow = winograd_conv(64, 64), winograd_conv(64, 32)
    with torch.no_grad():
        assert winograd_applies(wide, torch.randn(1, 64, 128, 96))  # 64 * 64 * 12288 px = 50 M
        assert not winograd_applies(wide, torch.randn(1, 64, 64, 96))  # 25 M < MIN_WORK
        assert not winograd_applies(narrow, torch.randn(1, 64, 256, 384))  # 32 < MIN_CHANNELS output channels
        assert not winograd_applies(winograd_conv(1024, 1024), torch.randn(1, 1024, 16, 24))  # 384 < MIN_PIXELS


def test_use_winograd_converts_only_plain_3x3_stride_1_convolutions():
    module = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 5, padding=2),
    )
    keys = set(module.state_dict())
    assert use_winograd(module) == 1
    assert [type(m) is WinogradConv2d for m in module] == [True] + [False] * 6
    assert set(module.state_dict()) == keys
    assert use_winograd(module) == 0  # already converted


@pytest.mark.parametrize("name", ["csm-small", "tcm-small"])
def test_models_use_winograd(name):
    model = build_model(name)
    converted = [m for m in model.modules() if isinstance(m, WinogradConv2d)]
    assert converted and not [m for m in model.modules() if wconv.eligible(m)]
