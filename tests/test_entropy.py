"""Channel-wise autoregressive entropy model: released key layout, values, exact rANS round trips, error paths."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from compressai.models.base import get_scale_table

from entropy import ChannelAutoregressiveEntropyModel, ContextBlock
from layers.ss2d import VSSBlock

REF_SHAPES = Path("/work/shared/data/csm_ref_state_dict_shapes.json")
ENTROPY_PREFIXES = (
    "atten_mean",
    "atten_scale",
    "cc_mean_transforms",
    "cc_scale_transforms",
    "lrp_transforms",
    "gaussian_conditional",
)

# Small model: 4 slices of 16 channels, context from at most 2 previous slices.
M, SLICES, SUPPORT = 64, 4, 2
SMALL = dict(M=M, num_slices=SLICES, max_support_slices=SUPPORT, context_dim=32, hidden=(48, 32))


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ChannelAutoregressiveEntropyModel(**{**SMALL, **overrides})


def updated(model):
    model.gaussian_conditional.update_scale_table(get_scale_table())
    return model.eval()


def latents(batch=1, size=4, seed=1):
    """(y, latent_means, latent_scales), with means close to y as a trained hyperprior would give."""
    g = torch.Generator().manual_seed(seed)
    y = 3 * torch.randn(batch, M, size, size, generator=g)
    latent_means = y + 0.5 * torch.randn(y.shape, generator=g)
    latent_scales = torch.rand(y.shape, generator=g)
    return y, latent_means, latent_scales


@pytest.mark.skipif(not REF_SHAPES.exists(), reason="released state_dict shapes not available")
def test_released_layout_keys_shapes_and_order():
    ref = json.loads(REF_SHAPES.read_text())
    ref = {k: v for k, v in ref.items() if k.split(".")[0] in ENTROPY_PREFIXES}
    global_keys = [k for k in ref if ".non_local_block." in k]
    expected = {k: v for k, v in ref.items() if ".non_local_block." not in k}
    model = ChannelAutoregressiveEntropyModel(320, 5, 5)  # Identity global branch: no non_local_block keys
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(expected)  # same names, same order
    assert ours == expected
    assert all(k.split(".")[2:4] == ["0", "non_local_block"] for k in global_keys)

    # Everything but the Swin global branches: the released 27.7 M minus its 10 Swin pairs.
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(math.prod(v) for k, v in expected.items() if not k.startswith("gaussian_conditional"))
    assert params == 23_703_520
    assert sum(math.prod(ref[k]) for k in global_keys) == 4_001_440


def test_support_channels_follow_max_support_slices():
    model = small_model()
    assert [model.support_channels(i) for i in range(SLICES)] == [64, 80, 96, 96]
    for i, channels in enumerate([64, 80, 96, 96]):
        block = model.atten_mean[i][0]
        assert isinstance(block, ContextBlock)
        assert block.in_conv.in_channels == block.out_conv.out_channels == channels
        assert model.cc_scale_transforms[i][0].in_channels == channels
        assert model.lrp_transforms[i][0].in_channels == channels + 16
        assert model.lrp_transforms[i][-1].out_channels == 16


@pytest.mark.parametrize("kwargs", [dict(M=64, num_slices=5), dict(M=64, num_slices=0), dict(max_support_slices=-1)])
def test_invalid_configuration_raises(kwargs):
    with pytest.raises(ValueError):
        ChannelAutoregressiveEntropyModel(**{**SMALL, **kwargs})


def test_forward_values():
    model = small_model().eval()
    y, means, scales = latents(batch=2)
    with torch.no_grad():
        y_hat, likelihoods = model(y, means, scales)
        mu, scale, mean_support = model.slice_params(0, means, scales, [])
    assert y_hat.shape == likelihoods.shape == y.shape
    assert likelihoods.min() > 0 and likelihoods.max() <= 1

    # Slice 0 by hand: rounding around mu, Gaussian mass of the unit bin, LRP correction of at most 0.5.
    q = torch.round(y[:, :16] - mu)
    s = scale.clamp(min=0.11)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = normal.cdf((0.5 - q.abs()) / s) - normal.cdf((-0.5 - q.abs()) / s)
    torch.testing.assert_close(likelihoods[:, :16], expected.clamp(min=1e-9), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(y_hat[:, :16], model.lrp(0, mean_support, q + mu))
    assert (y_hat[:, :16] - (q + mu)).abs().max() <= 0.5

    model.train()
    _, noisy = model(y, means, scales)
    assert noisy.min() > 0 and noisy.max() <= 1
    assert not torch.equal(noisy, likelihoods)  # uniform noise in training


def test_forward_checks_shapes():
    model = small_model()
    y, means, scales = latents()
    with pytest.raises(ValueError, match="latent_scales"):
        model(y, means, scales[:, :, :2])
    with pytest.raises(ValueError, match="latent_means"):
        model(y[:, :32], means[:, :32], scales[:, :32])


def test_round_trip_is_exact_per_image():
    model = small_model()
    # An untrained model predicts scales near 0 and codes most of y in bypass mode; scales of about 3, y's spread,
    # keep the symbols inside the CDFs, where the rate estimate holds.
    for transform in model.cc_scale_transforms:
        nn.init.constant_(transform[-1].bias, 3.0)
    updated(model)
    y, means, scales = latents(batch=2, size=5)
    strings, y_hat = model.compress(y, means, scales)
    assert isinstance(strings, list) and len(strings) == 2
    assert all(isinstance(s, bytes) for s in strings) and strings[0] != strings[1]
    assert torch.equal(model.decompress(strings, means, scales), y_hat)

    with torch.no_grad():
        y_hat_forward, likelihoods = model(y, means, scales)
    torch.testing.assert_close(y_hat, y_hat_forward, rtol=0, atol=1e-5)
    # The stream costs what the likelihoods promise, up to rANS overhead (64-bit state, 16-bit CDF precision).
    for b, string in enumerate(strings):
        bits = -likelihoods[b].log2().sum().item()
        assert abs(8 * len(string) - bits) < 0.02 * bits + 96

    # Each image's string stands alone: coding image 1 by itself gives the same string and y_hat.
    alone, y_hat_alone = model.compress(y[1:], means[1:], scales[1:])
    assert alone == strings[1:]
    torch.testing.assert_close(y_hat_alone, y_hat[1:], rtol=0, atol=1e-6)


class ConvGlobal(nn.Module):
    """A stand-in global branch with parameters: a 3x3 conv, (B, C, H, W) -> same."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("factory", [ConvGlobal, lambda c: VSSBlock(c, mlp_ratio=0)], ids=["conv", "vss"])
def test_global_block_factory(factory):
    model = small_model(global_block_factory=factory).train()
    global_blocks = [block[0].non_local_block for block in [*model.atten_mean, *model.atten_scale]]
    assert len({id(b) for b in global_blocks}) == 2 * SLICES  # one fresh branch per context block
    assert not isinstance(global_blocks[0], nn.Identity)
    y, means, scales = latents(size=4)
    y_hat, likelihoods = model(y, means, scales)
    (y_hat.square().sum() - likelihoods.log().sum()).backward()
    for name, p in model.named_parameters():
        if ".non_local_block." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    updated(model)
    strings, y_hat = model.compress(y, means, scales)
    assert torch.equal(model.decompress(strings, means, scales), y_hat)


def test_coding_before_update_raises():
    model = small_model().eval()
    y, means, scales = latents()
    with pytest.raises(RuntimeError, match=r"model\.update\(\)"):
        model.compress(y, means, scales)
    with pytest.raises(RuntimeError, match=r"model\.update\(\)"):
        model.decompress([b"\0" * 8], means, scales)


def test_tables_that_do_not_match_the_scale_table_are_refused():
    """The rANS coder indexes its CDFs by the scale table unchecked: a longer table (a damaged or mixed checkpoint)
    is refused, not read past the end of the CDFs."""
    model = updated(small_model())
    gc = model.gaussian_conditional
    gc.scale_table = torch.cat([gc.scale_table, gc.scale_table[-1:] * 2])
    y, means, scales = latents()
    with pytest.raises(RuntimeError, match=r"tables do not match: 64 CDFs, 64 lengths, 64 offsets for 65 scales"):
        model.compress(y, means, scales)


def test_damaged_or_mismatched_strings_raise_value_error():
    """Every damaged string raises ValueError (the decoder re-encodes what it read); none crashes the process."""
    model = updated(small_model())
    y, means, scales = latents(batch=2)
    strings, y_hat = model.compress(y, means, scales)
    good = strings[0]
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x5A
    damaged = {
        "truncated by one word": good[:-4],
        "truncated to half": good[: len(good) // 8 * 4],
        "one byte flipped": bytes(flipped),
        "not whole words": good[:-1],
        "empty": b"",
    }
    for what, string in damaged.items():
        try:
            model.decompress([string, strings[1]], means, scales)
        except ValueError:
            continue
        pytest.fail(f"{what}: decoded without ValueError")
    with pytest.raises(ValueError, match="2 strings"):
        model.decompress(strings[:1], means, scales)
    with pytest.raises(ValueError, match="not bytes"):
        model.decompress([good.decode("latin-1"), strings[1]], means, scales)
    with pytest.raises(ValueError, match="does not match"):
        model.decompress(strings, means, scales.flip(0))  # each string read with the other image's indexes
    assert torch.equal(model.decompress(strings, means, scales), y_hat)


def test_gradients_reach_every_parameter():
    model = small_model().train()
    y, means, scales = (t.requires_grad_() for t in latents(size=4))
    y_hat, likelihoods = model(y, means, scales)
    (-likelihoods.log2().sum() + (y_hat - y).square().sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (y, means, scales):
        assert t.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["slice_params", "lrp"])
def test_forward_compress_decompress_share_slice_functions(monkeypatch, method):
    """Shifting one method's output moves all three passes alike: none of them has its own copy."""
    model = updated(small_model())
    y, means, scales = latents(batch=2)
    with torch.no_grad():
        y_hat_forward, _ = model(y, means, scales)
    strings, y_hat = model.compress(y, means, scales)

    calls = []
    original = getattr(model, method)

    def shifted(i, *args):
        calls.append(i)
        out = original(i, *args)
        if method == "slice_params":
            mu, scale, mean_support = out
            return mu + 0.3, scale, mean_support
        return out + 0.3

    monkeypatch.setattr(model, method, shifted)
    with torch.no_grad():
        y_hat_forward_shifted, _ = model(y, means, scales)
    strings_shifted, y_hat_shifted = model.compress(y, means, scales)
    y_hat_decoded = model.decompress(strings_shifted, means, scales)
    assert calls == list(range(SLICES)) * 3

    assert not torch.allclose(y_hat_forward_shifted, y_hat_forward, atol=0.1)
    assert not torch.allclose(y_hat_shifted, y_hat, atol=0.1)
    torch.testing.assert_close(y_hat_shifted, y_hat_forward_shifted, rtol=0, atol=1e-5)
    assert torch.equal(y_hat_decoded, y_hat_shifted)
    assert strings_shifted != strings
