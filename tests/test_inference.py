"""Helpers of the CPU inference paths (layers/inference.py) and where the blocks take them."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import layers.ss2d
import layers.swin
from layers.inference import add_mlp_rows, conv1x1_on_parts, linear_rows, mix_to_parts
from layers.ss2d import VSSBlock
from layers.swin import SwinBlock


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [16, 1024])  # 70 pixels: four steps of 16 and a short last one; one step
def test_conv1x1_on_parts_equals_the_convolution_of_the_concatenation(dtype, rows):
    """A channel-major part and a channels-last one (as the SRB and TCM's block pass them), with and without the
    residual."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 10, 1).to(dtype)
    first, second = torch.randn(1, 5, 7, 10, dtype=dtype), torch.randn(1, 7, 10, 7, dtype=dtype)  # 5 + 7 channels
    residual = torch.randn(1, 10, 7, 10, dtype=dtype)
    with torch.no_grad():
        expected = conv(torch.cat((first, second.permute(0, 3, 1, 2)), dim=1))
        parts = (first.view(5, 70), second.view(70, 7).t())
        plain = conv1x1_on_parts(conv.weight.flatten(1), conv.bias, parts, rows=rows)
        with_residual = conv1x1_on_parts(conv.weight.flatten(1), conv.bias, parts, residual.view(10, 70), rows)
    torch.testing.assert_close(plain.view(1, 10, 7, 10), expected)
    torch.testing.assert_close(with_residual.view(1, 10, 7, 10), expected + residual)


@pytest.mark.parametrize("rows", [16, 1024])
def test_mix_to_parts_splits_the_convolution_into_a_map_and_rows(rows):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 10, 1)
    x = torch.randn(1, 12, 7, 10)
    with torch.no_grad():
        expected = conv(x)
        head, tail = mix_to_parts(x.view(12, 70), conv.weight.flatten(1), conv.bias, 4, rows)
    torch.testing.assert_close(head.view(1, 4, 7, 10), expected[:, :4])
    torch.testing.assert_close(tail.view(1, 7, 10, 6), expected[:, 4:].permute(0, 2, 3, 1))


@pytest.mark.parametrize("rows", [16, 1024])
def test_linear_rows_equals_linear(rows):
    torch.manual_seed(0)
    weight, x = torch.randn(9, 6), torch.randn(2, 5, 7, 6)  # 70 pixels over two images
    actual = linear_rows(x, weight, rows)
    assert actual.shape == (2, 5, 7, 9) and actual.is_contiguous()
    torch.testing.assert_close(actual, F.linear(x, weight))


def test_products_by_steps_handle_an_empty_map():
    weight, bias = torch.randn(6, 4), torch.randn(6)
    assert conv1x1_on_parts(weight, bias, (torch.empty(4, 0),), torch.empty(6, 0)).shape == (6, 0)
    head, tail = mix_to_parts(torch.empty(4, 0), weight, bias, 2)
    assert head.shape == (2, 0) and tail.shape == (0, 4)
    assert linear_rows(torch.empty(1, 0, 3, 4), weight).shape == (1, 0, 3, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_add_mlp_rows_equals_the_layers_one_after_the_other(dtype, approximate):
    torch.manual_seed(0)
    norm, fc1, act, fc2 = nn.LayerNorm(12), nn.Linear(12, 48), nn.GELU(approximate), nn.Linear(48, 12)
    for layer in (norm, fc1, fc2):
        layer.to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        x = torch.randn(2, 5, 7, 12, dtype=dtype)  # 70 pixels: four steps of 16 and a last one of 6
        expected = x + fc2(act(fc1(norm(x))))
        actual = add_mlp_rows(x.clone(), norm, fc1, act, fc2, rows=16)
        whole = add_mlp_rows(x.clone(), norm, fc1, act, fc2)  # one step
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(whole, expected)


def test_add_mlp_rows_works_in_place_and_on_an_empty_map():
    torch.manual_seed(0)
    norm, fc1, act, fc2 = nn.LayerNorm(4), nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4)
    with torch.no_grad():
        x = torch.randn(1, 3, 3, 4)
        assert add_mlp_rows(x, norm, fc1, act, fc2, rows=4) is x
        empty = torch.empty(1, 0, 5, 4)
        assert add_mlp_rows(empty, norm, fc1, act, fc2).shape == (1, 0, 5, 4)


def _count_calls(monkeypatch, module):
    calls = []
    real = module.add_mlp_rows
    monkeypatch.setattr(module, "add_mlp_rows", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    return calls


@pytest.mark.parametrize(
    "make_block, module, layout",
    [
        (lambda: VSSBlock(8, d_state=4, mlp_ratio=4.0, scan_backend="cpu"), layers.ss2d, "nchw"),
        (lambda: SwinBlock(8, 8, 4, 4, 0.0, "SW"), layers.swin, "nhwc"),
    ],
    ids=["vss", "swin"],
)
def test_blocks_run_their_mlp_by_rows_in_inference_only(monkeypatch, make_block, module, layout):
    """Eval mode without gradient: the MLP goes through add_mlp_rows, with the outputs of the layers as written;
    with a gradient, or in training mode (drop path), the layers run as written."""
    torch.manual_seed(0)
    block = make_block().eval()
    x = torch.randn(2, 8, 6, 5) if layout == "nchw" else torch.randn(2, 6, 5, 8)
    calls = _count_calls(monkeypatch, module)
    with torch.no_grad():
        by_rows = block(x)
    assert len(calls) == 1
    reference = block(x)  # parameters need gradients: the layers as written
    assert len(calls) == 1
    torch.testing.assert_close(by_rows, reference.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        block.train()(x)
    assert len(calls) == 1


def test_ss2d_gate_by_rows_equals_the_formula():
    """SS2D's tail in CPU inference: out_proj(out_norm(y) * SiLU(z)), z the in-projection's gate half, by steps of
    rows (here 16 of 70 pixels, the last step short)."""
    torch.manual_seed(0)
    module = layers.ss2d.SS2D(d_model=6, d_state=4, scan_backend="cpu").eval()
    x, y = torch.randn(2, 5, 7, 6), torch.randn(2, 5, 7, module.d_inner)
    with torch.no_grad():
        module.out_norm.weight.uniform_(0.5, 1.5)
        z = torch.nn.functional.linear(x, module.in_proj.weight[module.d_inner :])
        expected = module.out_proj(module.out_norm(y) * torch.nn.functional.silu(z))
        actual = module._gate_rows(x, y, rows=16)
        empty = module._gate_rows(x[:, :0], y[:, :0])
    torch.testing.assert_close(actual, expected)
    assert empty.shape == (2, 0, 7, 6)


@pytest.mark.parametrize("window_type", ["W", "SW"])
def test_window_attention_by_windows_equals_all_windows_at_once(monkeypatch, window_type):
    """CPU inference attends a few windows at a time (here 4 of 12, padding and the shift's masks included): the
    outputs of the path that attends all windows at once (taken when a gradient is needed)."""
    torch.manual_seed(0)
    msa = layers.swin.WMSA(16, 16, 8, 4, window_type)
    monkeypatch.setattr(layers.swin, "ROWS_PER_STEP", 64)  # 4 windows of 16 tokens per step
    steps = []
    real = msa._attend
    msa._attend = lambda w, *a: steps.append(w.shape[1]) or real(w, *a)
    x = torch.randn(2, 11, 14, 16)  # padded to 12 x 16: 3 x 4 windows
    with torch.no_grad():
        by_windows = msa(x)
    assert steps == [4, 4, 4]
    reference = msa(x)
    assert steps[3:] == [12]
    torch.testing.assert_close(by_windows, reference.detach(), rtol=1e-5, atol=1e-6)
