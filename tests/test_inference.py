"""Helpers of the CPU inference paths (layers/inference.py) and where the blocks take them."""

import pytest
import torch
import torch.nn as nn

import layers.ss2d
import layers.swin
from layers.inference import add_mlp_rows
from layers.ss2d import VSSBlock
from layers.swin import SwinBlock


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
