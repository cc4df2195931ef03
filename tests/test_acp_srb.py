"""Adaptive channel partition, the State-space Residual Block and the released code's blocks (layers/acp.py, srb.py)."""

import pytest
import torch

from layers.acp import AdaptiveChannelPartition, ChannelScore, _select_channels
from layers.srb import ConvResidualBlock, ReleasedConvSwinBlock, ReleasedConvVSSBlock, StateSpaceResidualBlock
from layers.ss2d import SS2D, VSSBlock
from layers.swin import ConvTransBlock
from tests.test_swin import released_shapes, state_shapes

# the pure PyTorch scan: these tests check the blocks, not the scan backends
BACKEND = "torch"


def images(channels=16, size=8):
    """Two images whose channels differ in level and spread, so their channel scores rank differently."""
    torch.manual_seed(1)
    x = torch.randn(2, channels, size, size)
    x[1] = x[1] * torch.linspace(0.2, 3.0, channels)[:, None, None] + torch.randn(channels)[:, None, None]
    return x


def test_adaptive_routes_each_image_by_its_scores():
    torch.manual_seed(0)
    acp = AdaptiveChannelPartition(16)
    x = images()
    with torch.no_grad():
        mixed, scores = acp.features(x)
        x_local, x_ssm, routing = acp(x)
    local_sets = []
    for b in range(2):
        ranked = sorted(range(16), key=lambda c: (-scores[b, c].item(), c))
        local, ssm = sorted(ranked[:8]), sorted(ranked[8:])
        assert routing[b].tolist() == local + ssm
        torch.testing.assert_close(x_local[b], mixed[b, local], rtol=0, atol=0)
        torch.testing.assert_close(x_ssm[b], mixed[b, ssm], rtol=0, atol=0)
        local_sets.append(local)
    # a fixed split would route the same channels for both images
    assert local_sets[0] != local_sets[1]


def test_tied_scores_route_by_channel_index():
    torch.manual_seed(0)
    acp = AdaptiveChannelPartition(16)
    with torch.no_grad():
        acp.score.channelattention[3].weight.zero_()
        acp.score.channelattention[3].bias.zero_()  # s = 0.5 everywhere
        x_local, _, routing = acp(images())
    assert torch.equal(routing, torch.arange(16).expand(2, 16))
    torch.testing.assert_close(x_local, acp.features(images())[0][:, :8].detach(), rtol=0, atol=0)


def test_merge_puts_branch_outputs_back_at_their_channels():
    torch.manual_seed(0)
    acp = AdaptiveChannelPartition(16, ratio=0.25)
    x = images()
    with torch.no_grad():
        mixed, _ = acp.features(x)
        x_local, x_ssm, routing = acp(x)
        torch.testing.assert_close(acp.merge(x_local, x_ssm, routing), mixed, rtol=0, atol=0)
        merged = acp.merge(x_local + 1.0, torch.zeros_like(x_ssm), routing)
    assert x_local.shape[1] == 4 and x_ssm.shape[1] == 12
    for b in range(2):
        local = routing[b, :4]
        ssm = routing[b, 4:]
        torch.testing.assert_close(merged[b, local], mixed[b, local] + 1.0, rtol=0, atol=0)
        assert torch.all(merged[b, ssm] == 0)


@pytest.mark.parametrize("mode", ["static", "none"])
def test_static_and_none_split_at_a_fixed_index(mode):
    torch.manual_seed(0)
    acp = AdaptiveChannelPartition(16, ratio=0.25, mode=mode)
    x = images()
    with torch.no_grad():
        mixed, scores = acp.features(x)
        x_local, x_ssm, routing = acp(x)
        assert routing is None
        torch.testing.assert_close(x_local, mixed[:, :4], rtol=0, atol=0)
        torch.testing.assert_close(x_ssm, mixed[:, 4:], rtol=0, atol=0)
        torch.testing.assert_close(acp.merge(x_local, x_ssm, routing), mixed, rtol=0, atol=0)
        if mode == "none":
            assert scores is None
            assert {name for name, _ in acp.named_parameters()} == {"mix.weight", "mix.bias"}
            torch.testing.assert_close(mixed, acp.mix(x), rtol=0, atol=0)
        else:
            refined = x + acp.score.net(x)
            expected = acp.mix(refined * acp.score.channelattention(refined))
            torch.testing.assert_close(mixed, expected, rtol=0, atol=0)


def test_acp_gradients_reach_the_scorer():
    torch.manual_seed(0)
    acp = AdaptiveChannelPartition(16)
    acp.merge(*acp(images())).sum().backward()
    for name, p in acp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_acp_rejects_an_empty_branch():
    with pytest.raises(ValueError):
        AdaptiveChannelPartition(16, ratio=1.0)
    with pytest.raises(ValueError):
        AdaptiveChannelPartition(16, mode="random")


def test_channel_score_formula():
    torch.manual_seed(0)
    score = ChannelScore(16)
    x = images()
    with torch.no_grad():
        refined = x + score.net[2](torch.nn.functional.gelu(score.net[0](x)))
        pooled = refined.mean((2, 3), keepdim=True)
        ca = score.channelattention
        s = torch.sigmoid(ca[3](torch.relu(ca[1](pooled))))
        torch.testing.assert_close(score(x), refined * s)


def srb(**kwargs):
    torch.manual_seed(0)
    return StateSpaceResidualBlock(32, scan_backend=BACKEND, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"acp": "none", "fusion": "residual"}, {"ssm_branch": False, "acp": "static"},
     {"acp_refine": False, "cnn_depth": 2, "mlp_ratio": 0.0}],
    ids=["default", "none-residual", "cnn-only", "lite"],
)
def test_srb_gradients_reach_every_parameter(kwargs):
    block = srb(**kwargs)
    x = images(32).requires_grad_()
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_srb_composition_and_outer_skip():
    block = srb().eval()
    x = images(32)
    with torch.no_grad():
        x_local, x_ssm, routing = block.acp(x)
        merged = block.acp.merge(block.cnn_branch(x_local), block.ssm_branch(x_ssm), routing)
        torch.testing.assert_close(block(x), x + block.fusion(merged))
        assert isinstance(block.ssm_branch, VSSBlock) and block.ssm_branch.mlp is not None
        block.fusion.weight.zero_()
        block.fusion.bias.zero_()
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_srb_cnn_branch_is_the_figure_residual_block():
    block = srb()
    x = images(16)
    with torch.no_grad():
        body = block.cnn_branch.body
        expected = x + body[4](torch.relu(body[2](torch.relu(body[0](x)))))
        torch.testing.assert_close(block.cnn_branch(x), expected)


def test_lite_srb_scores_without_refinement_and_has_two_convolutions():
    block = srb(acp_refine=False, cnn_depth=2, mlp_ratio=0.0)
    x = images(32)
    with torch.no_grad():
        score = block.acp.score
        assert score.net is None and torch.equal(score.refine(x), x)
        torch.testing.assert_close(score(x), x * score.channelattention(x))
        body = block.cnn_branch.body
        assert len(body) == 3
        half = x[:, :16]
        torch.testing.assert_close(block.cnn_branch(half), half + body[2](torch.relu(body[0](half))))
    assert block.ssm_branch.mlp is None
    count = {name: sum(p.numel() for p in part.parameters()) for name, part in StateSpaceResidualBlock(
        256, acp_refine=False, cnn_depth=2, mlp_ratio=0.0).named_children()}
    # ACP: score 2 x 1x1 (256 <-> 128) + 1x1 mix; CNN: 2 conv3x3(128); VSS without MLP; 1x1 fusion
    assert count == {"acp": 131712, "cnn_branch": 295168, "ssm_branch": 169216, "fusion": 65792}


@pytest.mark.parametrize("batch", [1, 3])
def test_select_channels_is_a_per_image_gather(batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 6, 4, 5)
    order = torch.stack([torch.randperm(6) for _ in range(batch)])
    expected = x.gather(1, order[:, :, None, None].expand_as(x))
    assert torch.equal(_select_channels(x, order), expected)


def test_srb_without_ssm_branch_has_no_vss_parameters():
    block = srb(ssm_branch=False)
    assert not any(isinstance(m, (VSSBlock, SS2D)) for m in block.modules())
    assert isinstance(block.ssm_branch, ConvResidualBlock)
    assert not any(".op." in name or "norm" in name for name, _ in block.named_parameters())
    assert block(images(32)).shape == (2, 32, 8, 8)


def test_srb_parameter_budget_at_256_channels():
    """The spec's estimate for one SRB(256): 1.5 M = ACP 0.72 M + CNN 0.44 M + VSS 0.30 M + 1x1 fusion 0.07 M."""
    block = StateSpaceResidualBlock(256)
    count = {name: sum(p.numel() for p in part.parameters()) for name, part in block.named_children()}
    assert count == {"acp": 721920, "cnn_branch": 442752, "ssm_branch": 301184, "fusion": 65792}
    assert sum(p.numel() for p in block.parameters()) == 1531648


def test_released_blocks_reproduce_the_checkpoint_keys():
    assert state_shapes(ReleasedConvSwinBlock(256, 16, 8, 0.0, "W", with_score=True)) == released_shapes("g_a.1.")
    assert state_shapes(ReleasedConvSwinBlock(256, 16, 8, 0.0, "SW")) == released_shapes("g_a.2.")
    assert state_shapes(ReleasedConvVSSBlock(256)) == released_shapes("g_a.4.")
    # h_a's blocks carry no score in the checkpoint
    assert state_shapes(ReleasedConvSwinBlock(256, 32, 4, 0.0, "W")) == released_shapes("h_a.1.")
    assert state_shapes(ReleasedConvSwinBlock(256, 16, 8, 0.0, "W", with_score=True)) == released_shapes("g_s.7.")
    assert state_shapes(ReleasedConvVSSBlock(256)) == released_shapes("g_s.1.")


def test_released_vss_block_adds_to_the_scored_input():
    torch.manual_seed(0)
    block = ReleasedConvVSSBlock(32, scan_backend=BACKEND).eval()
    assert block.mambaVC_block.mlp is None and block.mambaVC_block.drop_path.p == 0.1
    x = images(32)
    with torch.no_grad():
        scored = block.score(x)
        a, b = block.conv1_1(scored).split(16, dim=1)
        expected = scored + block.conv1_2(torch.cat((block.conv_block(a) + a, block.mambaVC_block(b)), 1))
        torch.testing.assert_close(block(x), expected)
        block.conv1_2.weight.zero_()
        block.conv1_2.bias.zero_()
        torch.testing.assert_close(block(x), scored, rtol=0, atol=0)


@pytest.mark.parametrize("with_score", [True, False])
def test_released_swin_block_applies_conv1_1_twice(with_score):
    torch.manual_seed(0)
    block = ReleasedConvSwinBlock(32, 8, 4, 0.0, "SW", with_score=with_score)
    x = images(32)
    with torch.no_grad():
        y = block.conv1_1(x)
        if with_score:
            y = block.score(y)
        a, b = block.conv1_1(y).split(16, dim=1)
        b = block.trans_block(b.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        expected = x + block.conv1_2(torch.cat((block.conv_block(a) + a, b), 1))
        torch.testing.assert_close(block(x), expected)
        if not with_score:
            # with conv1_1 the identity, the quirk vanishes and the block is TCM's
            tcm = ConvTransBlock(16, 16, 8, 4, 0.0, "SW")
            block.conv1_1.weight.copy_(torch.eye(32)[:, :, None, None])
            block.conv1_1.bias.zero_()
            tcm.load_state_dict(block.state_dict())
            torch.testing.assert_close(block(x), tcm(x))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"acp": "static"}, {"acp": "none"}, {"ssm_branch": False}, {"acp_refine": False, "cnn_depth": 2,
     "mlp_ratio": 0.0}, {"scan_directions": 2, "ratio": 0.25}],
)
def test_srb_folded_inference_path_is_the_same_function(kwargs, monkeypatch):
    """CPU inference folds the score and routing into the 1x1 mix and the merge into the fusion: same outputs as the
    unfolded path (taken when a gradient is needed), image by image with each image's own routing."""
    block = srb(**kwargs).eval()
    x = images(32, size=12)
    folded = []
    real = block._forward_folded
    monkeypatch.setattr(block, "_forward_folded", lambda image: folded.append(image.shape) or real(image))
    with torch.no_grad():
        fast = block(x)
    with torch.enable_grad():
        reference = block(x)
    assert folded == [(1, 32, 12, 12)] * 2 and reference.requires_grad
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-5, atol=1e-5)
    if block.acp.mode == "adaptive":
        with torch.no_grad():
            routing = block.acp(x)[2]
        assert not torch.equal(routing[0], routing[1])  # the two images really route differently


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"acp": "static"}, {"acp": "none"}, {"ssm_branch": False}, {"acp_refine": False, "cnn_depth": 2,
     "mlp_ratio": 0.0}, {"scan_directions": 2, "ratio": 0.25}],
)
def test_srb_batched_training_path_is_the_same_function(kwargs):
    """With gradients the block folds each image's score and routing into batched 1x1 products
    (``_forward_batched``): output, input gradient and every parameter's gradient (the scorer's included) equal
    those of the block as drawn (``forward_unfolded``) within float32 rounding."""
    block = srb(**kwargs).train()
    x = images(32, size=12)
    grad_out = torch.randn_like(x)
    results = []
    for forward in (block.forward, block.forward_unfolded):
        block.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        y = forward(leaf)
        y.backward(grad_out)
        results.append([y.detach(), leaf.grad] + [p.grad for p in block.parameters()])
    for actual, expected in zip(*results):
        assert actual is not None
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    if block.acp.mode == "adaptive":
        with torch.no_grad():
            routing = block.acp(x)[2]
        assert not torch.equal(routing[0], routing[1])


def test_srb_with_residual_fusion_does_not_fold():
    block = srb(fusion="residual").eval()
    with torch.no_grad():
        assert not block._folds(images(32))
