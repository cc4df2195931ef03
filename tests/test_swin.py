"""Window attention, the Swin block, TCM's CNN + Swin block and the W + SW pair (layers/swin.py)."""

import json
from pathlib import Path

import pytest
import torch

from layers.swin import WMSA, ConvTransBlock, SwinBlock, SwinPair

REPO = Path(__file__).resolve().parents[1]
# the released checkpoint's key shapes live in the shared folder, beside the checkout or inside it
SHAPES = [root / "shared" / "data" / "csm_ref_state_dict_shapes.json" for root in (REPO, REPO.parent)]


def naive_wmsa(msa, x):
    """WMSA written out token by token: the map is zero-padded to whole windows and rolled; per window and head,
    every real token takes softmax(q k^T / sqrt(d) + bias) v over the real tokens of its window that wrapped around
    in the roll exactly as it did (rows and columns alike); roll back, crop.

    x: (B, H, W, C), H and W larger than one window in total (so SW does shift).
    """
    batch, height, width, channels = x.shape
    w, hd = msa.window_size, msa.head_dim
    shift = w // 2 if msa.type == "SW" else 0
    padded_height, padded_width = -(-height // w) * w, -(-width // w) * w
    x = torch.nn.functional.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height))
    x = torch.roll(x, (-shift, -shift), dims=(1, 2))
    qkv = msa.embedding_layer(x)
    q, k, v = qkv[..., :channels], qkv[..., channels : 2 * channels], qkv[..., 2 * channels :]
    out = torch.zeros_like(x)
    params = msa.relative_position_params

    def real(r, c):
        return (r + shift) % padded_height < height and (c + shift) % padded_width < width

    def side(r, c):
        return r + shift >= padded_height, c + shift >= padded_width

    for b in range(batch):
        for top in range(0, padded_height, w):
            for left in range(0, padded_width, w):
                tokens = [(top + i, left + j) for i in range(w) for j in range(w) if real(top + i, left + j)]
                for h in range(msa.n_heads):
                    heads = slice(h * hd, (h + 1) * hd)
                    for r, c in tokens:
                        logits, values = [], []
                        for r2, c2 in tokens:
                            if side(r, c) != side(r2, c2):
                                continue
                            bias = params[h, r - r2 + w - 1, c - c2 + w - 1]
                            logits.append(q[b, r, c, heads] @ k[b, r2, c2, heads] * hd**-0.5 + bias)
                            values.append(v[b, r2, c2, heads])
                        weights = torch.stack(logits).softmax(0)
                        out[b, r, c, heads] = (weights[:, None] * torch.stack(values)).sum(0)
    out = torch.roll(msa.linear(out), (shift, shift), dims=(1, 2))
    return out[:, :height, :width]


@pytest.mark.parametrize("window_type", ["W", "SW"])
def test_wmsa_equals_naive_attention(window_type):
    torch.manual_seed(0)
    msa = WMSA(16, 16, 8, 4, window_type)
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(msa(x), naive_wmsa(msa, x), rtol=1e-5, atol=1e-5)


def test_relative_bias_is_indexed_by_query_minus_key():
    torch.manual_seed(0)
    msa = WMSA(8, 8, 4, 3, "W")
    bias = msa.relative_embedding()
    assert bias.shape == (2, 9, 9)
    # query (0, 0) = token 0, key (2, 1) = token 7: offset (-2, -1) -> index (0, 1)
    assert bias[1, 0, 7] == msa.relative_position_params[1, 0, 1]
    assert bias[0, 7, 0] == msa.relative_position_params[0, 4, 3]


def test_shifted_windows_do_not_attend_across_the_wrap():
    torch.manual_seed(0)
    msa = WMSA(16, 16, 8, 4, "SW").eval()
    x = torch.randn(1, 8, 8, 16)
    x2 = x.clone()
    x2[0, 0, 0] += 10.0
    with torch.no_grad():
        changed = (msa(x2) - msa(x)).abs().amax(-1)[0] > 1e-6
    # after the roll by -2, (0, 0) shares its 4x4 window with rows and columns {6, 7, 0, 1}; of those it may only
    # reach the tokens that wrapped like itself: rows {0, 1} x columns {0, 1}
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(changed, expected)

    msa.type = "W"
    with torch.no_grad():
        changed = (msa(x2) - msa(x)).abs().amax(-1)[0] > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("window_type", ["W", "SW"])
def test_padding_is_invisible(window_type):
    """On a 6x10 map (window 4, padded to 8x12) every real token sees exactly the real tokens of its window."""
    torch.manual_seed(0)
    msa = WMSA(16, 16, 8, 4, window_type)
    x = torch.randn(1, 6, 10, 16)
    with torch.no_grad():
        out = msa(x)
        torch.testing.assert_close(out, naive_wmsa(msa, x), rtol=1e-5, atol=1e-5)
        if window_type == "W":
            # a partial window seen as a map of its own: same tokens at the same in-window positions
            torch.testing.assert_close(out[:, 4:, 8:], msa(x[:, 4:, 8:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(4, 4), (2, 3), (1, 1)])
def test_map_within_one_window_is_not_shifted(size):
    torch.manual_seed(0)
    block = SwinBlock(16, 16, 8, 4, 0.0, "SW")
    plain = SwinBlock(16, 16, 8, 4, 0.0, "W")
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(x))


def test_one_token_attends_to_itself():
    torch.manual_seed(0)
    msa = WMSA(16, 16, 8, 8, "SW")
    x = torch.randn(3, 1, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(msa(x), msa.linear(msa.embedding_layer(x)[..., 32:]))


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (5, 7), (9, 4), (8, 8)])
@pytest.mark.parametrize("window_type", ["W", "SW"])
def test_swin_block_any_size_is_finite_with_finite_gradients(size, window_type):
    torch.manual_seed(0)
    block = SwinBlock(16, 16, 8, 4, 0.0, window_type)
    x = torch.randn(2, *size, 16, requires_grad=True)
    y = block(x)
    y.square().sum().backward()
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_swin_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = SwinBlock(16, 16, 8, 4, 0.0, "SW")
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        h = x + block.msa(block.ln1(x))
        expected = h + block.mlp[2](torch.nn.functional.gelu(block.mlp[0](block.ln2(h))))
        torch.testing.assert_close(block(x), expected)


def test_conv_trans_block_matches_tcm_formula():
    torch.manual_seed(0)
    block = ConvTransBlock(16, 16, 8, 4, 0.0, "SW")
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        a, b = block.conv1_1(x).split(16, dim=1)
        a = block.conv_block(a) + a
        b = block.trans_block(b.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(block(x), x + block.conv1_2(torch.cat((a, b), 1)))


def test_conv_trans_block_one_image_inference_folds_the_concatenation():
    """On one image without gradient, conv1_2 runs as one product per branch instead of on the concatenation: the
    same outputs as the path taken when a gradient is needed."""
    torch.manual_seed(0)
    block = ConvTransBlock(16, 24, 8, 4, 0.0, "W")
    x = torch.randn(1, 40, 12, 10)
    calls = []
    real = block.conv1_2.forward
    block.conv1_2.forward = lambda t: calls.append(t.shape) or real(t)
    with torch.no_grad():
        folded = block(x)
    assert not calls
    with torch.enable_grad():
        reference = block(x)
    assert calls == [(1, 40, 12, 10)]
    torch.testing.assert_close(folded, reference.detach(), rtol=1e-5, atol=1e-5)


def test_swin_pair_is_w_then_sw():
    torch.manual_seed(0)
    pair = SwinPair(16, 8, 4)
    assert (pair.block_1.msa.type, pair.block_2.msa.type) == ("W", "SW")
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = pair.block_2(pair.block_1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        torch.testing.assert_close(pair(x), expected)


def released_shapes(prefix):
    """{key: shape} of the released checkpoint's entries under ``prefix``, with the prefix stripped."""
    path = next((p for p in SHAPES if p.exists()), None)
    if path is None:
        pytest.skip("csm_ref_state_dict_shapes.json not found")
    shapes = json.loads(path.read_text())
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def state_shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_keys_match_released_checkpoint():
    assert state_shapes(ConvTransBlock(128, 128, 32, 4, 0.0, "W")) == released_shapes("h_a.1.")
    assert state_shapes(ConvTransBlock(128, 128, 16, 8, 0.0, "SW")) == released_shapes("g_a.2.")
    assert state_shapes(SwinPair(128, 16, 8)) == released_shapes("atten_mean.0.0.non_local_block.")
