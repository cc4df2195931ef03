"""CSM: the hybrid CNN-SSM learned image codec, assembled from a ``CSMConfig``.

``g_a``: ResidualBlockWithStride(3, 2N) + stage 1 + ResidualBlockWithStride + stage 2 + ResidualBlockWithStride +
stage 3 + conv3x3(2N, M, stride 2); ``g_s`` mirrors it with ResidualBlockUpsample and subpel_conv3x3;
``h_a``: ResidualBlockWithStride(M, 2N) + blocks + conv3x3(2N, Z, stride 2); ``h_mean_s`` / ``h_scale_s``:
ResidualBlockUpsample(Z, 2N) + blocks + subpel_conv3x3(2N, M, 2); the hyper-latent z is coded by an
``EntropyBottleneck``, y by the ``ChannelAutoregressiveEntropyModel``. The stage blocks are SRBs (the paper), TCM
blocks (the baseline) or the released code's hybrid blocks, so that one class runs every preset. The module indices
of the ``nn.Sequential`` transforms match the released checkpoints' keys.
"""

import copy

import torch
import torch.nn as nn
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import ResidualBlockUpsample, ResidualBlockWithStride, conv3x3, subpel_conv3x3
from compressai.models import CompressionModel
from compressai.ops import quantize_ste

from entropy import ChannelAutoregressiveEntropyModel
from layers.conv import use_winograd
from layers.srb import ReleasedConvSwinBlock, ReleasedConvVSSBlock, StateSpaceResidualBlock
from layers.ss2d import SS2D, VSSBlock
from layers.swin import ConvTransBlock, SwinPair

from .config import CSMConfig

PAD_MULTIPLE = 64  # g_a downsamples by 16 and h_a by 4 more
# Deterministic coding: mu, scale and the LRP correction are rounded to multiples of this (a power of two, so the
# rounding and y_hat = symbols + mu + correction are exact).
DETERMINISTIC_GRID = 2.0**-8


class ModelNotUpdatedError(RuntimeError):
    """compress/decompress called before ``update()`` built the entropy coder's tables."""


def _alternating(i):
    return "W" if i % 2 == 0 else "SW"


class CSM(CompressionModel):
    """The CSM family of models (paper figure, released layout, TCM baseline, ablations) from one config.

    ``forward(x)``: x (B, 3, H, W) in [0, 1], H and W multiples of 64 ->
    ``{"x_hat": (B, 3, H, W), "likelihoods": {"y": (B, M, H/16, W/16), "z": (B, Z, H/64, W/64)}}``.
    ``compress(x)`` -> ``{"strings": [y_strings, z_strings], "shape": (H/64, W/64), "y_hat": ...}``, one string per
    image in each list. ``decompress(strings, shape)`` -> ``{"x_hat": ..., "y_hat": ...}``.

    ``deterministic`` (default False) makes compress/decompress derive the entropy parameters (h_mean_s, h_scale_s
    and the entropy model's slice parameters and LRP) from float64 CPU copies of those modules, with the float64
    PyTorch scan, and round mu, scale and the LRP correction to a ``DETERMINISTIC_GRID`` grid: float32 results
    change with the thread count, the scan backend and the device, enough to flip a quantisation or scale-table
    index, while float64 differences (~1e-15) would have to straddle a grid point to matter. A decoder must use the
    mode of its encoder.
    """

    def __init__(self, config=None, preset=None, scan_backend="auto"):
        super().__init__()
        cfg = config if config is not None else CSMConfig()
        self.config = cfg
        self.preset = preset
        wide = 2 * cfg.N
        self._scan_backend = scan_backend
        self.deterministic = False

        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, wide, stride=2),
            *self._stage(0, wide),
            ResidualBlockWithStride(wide, wide, stride=2),
            *self._stage(1, wide),
            ResidualBlockWithStride(wide, wide, stride=2),
            *self._stage(2, wide),
            conv3x3(wide, cfg.M, stride=2),
        )
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(cfg.M, wide, 2),
            *self._stage(3, wide),
            ResidualBlockUpsample(wide, wide, 2),
            *self._stage(4, wide),
            ResidualBlockUpsample(wide, wide, 2),
            *self._stage(5, wide),
            subpel_conv3x3(wide, 3, 2),
        )
        self.h_a = nn.Sequential(
            ResidualBlockWithStride(cfg.M, wide, stride=2),
            *self._hyper_blocks(wide),
            conv3x3(wide, cfg.Z, stride=2),
        )
        self.h_mean_s = self._hyper_synthesis(wide)
        self.h_scale_s = self._hyper_synthesis(wide)
        self.entropy_bottleneck = EntropyBottleneck(cfg.Z)
        self.entropy_model = ChannelAutoregressiveEntropyModel(
            cfg.M,
            cfg.num_slices,
            cfg.max_support_slices,
            global_block_factory=self._context_global_block,
            context_dim=cfg.context_dim,
            hidden=cfg.cc_hidden,
        )
        # CPU inference computes the 3x3 convolutions by Winograd's algorithm (layers.conv); parameters, keys and
        # training are unchanged.
        use_winograd(self)

    # --- construction -------------------------------------------------------------------------------------------
    def _srb(self, channels):
        cfg = self.config
        return StateSpaceResidualBlock(
            channels,
            ratio=cfg.acp_ratio,
            acp=cfg.acp,
            acp_refine=cfg.acp_refine,
            cnn_depth=cfg.cnn_depth,
            ssm_branch=cfg.ssm_branch,
            fusion=cfg.fusion,
            scan_directions=cfg.scan_directions,
            d_state=cfg.d_state,
            ssm_ratio=cfg.ssm_ratio,
            mlp_ratio=cfg.mlp_ratio,
            drop_path=cfg.drop_path,
            scan_backend=self._scan_backend,
        )

    def _stage(self, stage, channels):
        """Blocks of one stage: 0-2 are g_a's stages 1-3, 3-5 are g_s's stages 1-3."""
        cfg = self.config
        count = cfg.blocks_per_stage
        if cfg.transform_block == "srb":
            return [self._srb(channels) for _ in range(count)]
        head_dim = cfg.head_dims[stage]
        if cfg.transform_block == "tcm":
            half = channels // 2
            return [
                ConvTransBlock(half, channels - half, head_dim, cfg.window, cfg.drop_path, _alternating(i))
                for i in range(count)
            ]
        # Released layout: CNN + Swin blocks in the outermost stages (the first of a pair with the channel score),
        # CNN + VSS blocks with the score in the others.
        if stage in (0, 5):
            return [
                ReleasedConvSwinBlock(channels, head_dim, cfg.window, 0.0, _alternating(i), with_score=i == 0)
                for i in range(count)
            ]
        return [ReleasedConvVSSBlock(channels, drop_path=0.1, scan_backend=self._scan_backend) for _ in range(count)]

    def _hyper_blocks(self, channels):
        cfg = self.config
        if cfg.hyper_block == "srb":
            return [self._srb(channels) for _ in range(cfg.blocks_per_stage)]
        half = channels // 2
        return [
            ConvTransBlock(half, channels - half, cfg.hyper_head_dim, cfg.hyper_window, 0.0, _alternating(i))
            for i in range(cfg.blocks_per_stage)
        ]

    def _hyper_synthesis(self, channels):
        cfg = self.config
        return nn.Sequential(
            ResidualBlockUpsample(cfg.Z, channels, 2),
            *self._hyper_blocks(channels),
            subpel_conv3x3(channels, cfg.M, 2),
        )

    def _context_global_block(self, channels):
        cfg = self.config
        if cfg.context == "ssm":
            return VSSBlock(
                channels,
                d_state=cfg.d_state,
                ssm_ratio=cfg.ssm_ratio,
                mlp_ratio=cfg.mlp_ratio,
                scan_directions=cfg.scan_directions,
                scan_backend=self._scan_backend,
            )
        return SwinPair(channels, cfg.context_head_dim, cfg.context_window)

    # --- run-time settings --------------------------------------------------------------------------------------
    @property
    def scan_backend(self):
        return self._scan_backend

    @scan_backend.setter
    def scan_backend(self, name):
        """Selective-scan backend of every SS2D in the model ("auto", "cpu", "torch", "cuda", "ref")."""
        self._scan_backend = name
        for module in self.modules():
            if isinstance(module, SS2D):
                module.scan_backend = name

    # --- coding -------------------------------------------------------------------------------------------------
    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W); got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % PAD_MULTIPLE or width % PAD_MULTIPLE:
            raise ValueError(
                f"H and W must be multiples of {PAD_MULTIPLE}; got {height}x{width} "
                "(pad with utils.image.pad_center(x, 64) and crop the output back)"
            )

    def _check_updated(self):
        tables = (
            self.entropy_bottleneck._quantized_cdf,
            self.entropy_bottleneck._offset,
            self.entropy_model.gaussian_conditional._quantized_cdf,
        )
        if any(t.numel() == 0 for t in tables):
            raise ModelNotUpdatedError(
                "the entropy coder's tables are empty: call model.update() (or update(force=True) after changing "
                "weights) before compress/decompress"
            )

    def _hyper_params(self, z_hat):
        return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

    def _coding_path(self):
        """``(h_mean_s, h_scale_s, entropy_model, cast)`` for compress/decompress: the model's own modules and the
        identity, or, in deterministic mode, float64 CPU copies (float64 PyTorch scan, parameter grid) and a cast of
        the inputs to float64 on the CPU. Copied per call, so they always hold the current weights."""
        modules = (self.h_mean_s, self.h_scale_s, self.entropy_model)
        if not self.deterministic:
            return (*modules, lambda t: t)
        copies = copy.deepcopy(nn.ModuleList(modules)).to("cpu", torch.float64)
        for module in copies.modules():
            if isinstance(module, SS2D):
                module.scan_backend = "torch"  # the one fast backend that computes in float64
        copies[2].param_grid = DETERMINISTIC_GRID
        return (*copies, lambda t: t.to("cpu", torch.float64))

    def forward(self, x):
        self._check_input(x)
        y = self.g_a(x)
        y_hat, likelihoods = self.forward_latent(y)
        return {"x_hat": self.g_s(y_hat), "likelihoods": likelihoods}

    def forward_latent(self, y):
        """The entropy half of ``forward`` on a latent y (B, M, h, w), h and w multiples of 4:
        ``(y_hat, {"y": y likelihoods, "z": z likelihoods})`` (tiled coding estimates rates with it)."""
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        z_offset = self.entropy_bottleneck._get_medians()
        z_hat = quantize_ste(z - z_offset) + z_offset
        latent_means, latent_scales = self._hyper_params(z_hat)
        y_hat, y_likelihoods = self.entropy_model(y, latent_means, latent_scales)
        return y_hat, {"y": y_likelihoods, "z": z_likelihoods}

    @torch.no_grad()
    def compress(self, x):
        self._check_input(x)
        self._check_updated()
        return self.compress_latent(self.g_a(x))

    @torch.no_grad()
    def compress_latent(self, y):
        """Entropy-code a latent y (B, M, h, w), h and w multiples of 4 (``compress`` without ``g_a``):
        ``{"strings": [y_strings, z_strings], "shape": z's (h, w), "y_hat"}``."""
        self._check_updated()
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        h_mean_s, h_scale_s, entropy_model, cast = self._coding_path()
        z_hat = cast(z_hat)
        y_strings, y_hat = entropy_model.compress(cast(y), h_mean_s(z_hat), h_scale_s(z_hat))
        # Exact in deterministic mode: y_hat is integers plus multiples of the grid.
        return {"strings": [y_strings, z_strings], "shape": tuple(z.shape[-2:]), "y_hat": y_hat.to(y)}

    @torch.no_grad()
    def decompress(self, strings, shape):
        y_hat = self.decompress_latent(strings, shape)
        x_hat = self.g_s(y_hat).clamp_(0, 1)
        return {"x_hat": x_hat, "y_hat": y_hat}

    @torch.no_grad()
    def decompress_latent(self, strings, shape):
        """The latent y_hat of ``compress_latent``'s strings and z shape (``decompress`` without ``g_s``)."""
        self._check_updated()
        if len(strings) != 2 or len(strings[0]) != len(strings[1]):
            raise ValueError("strings must be [y_strings, z_strings] with one string per image in each")
        z_hat = self.entropy_bottleneck.decompress(strings[1], tuple(shape))
        h_mean_s, h_scale_s, entropy_model, cast = self._coding_path()
        device, dtype = z_hat.device, z_hat.dtype
        z_hat = cast(z_hat)
        return entropy_model.decompress(strings[0], h_mean_s(z_hat), h_scale_s(z_hat)).to(device, dtype)
