"""Channel-wise autoregressive entropy model of the latent ``y`` (Minnen & Singh's slices, TCM's context blocks + LRP).

``y`` is cut along channels into ``num_slices`` slices. Slice ``i`` is coded with a Gaussian whose mean and scale are
predicted from the hyperprior's ``latent_means`` / ``latent_scales`` and the already decoded slices
``y_hat_0 .. y_hat_{min(i, max_support_slices) - 1}``, each support first going through a ``ContextBlock``. Latent
residual prediction (LRP) then corrects the dequantized slice from the same context. ``slice_params`` and ``lrp``
are the only places that compute these, and ``forward``, ``compress`` and ``decompress`` all call them.

Parameter names follow the released code (``atten_mean``, ``atten_scale``, ``cc_mean_transforms``,
``cc_scale_transforms``, ``lrp_transforms``, ``gaussian_conditional``).
"""

import torch
import torch.nn as nn
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import GaussianConditional
from compressai.layers import conv3x3
from compressai.ops import quantize_ste

from .context import ContextBlock

# rANS64 streams are whole 32-bit words, with the 64-bit final state first.
_WORD_BYTES = 4
_MIN_STREAM_BYTES = 8


def _param_transform(in_channels, out_channels, hidden):
    """conv3x3(in -> hidden[0]) -> GELU -> conv3x3(hidden[0] -> hidden[1]) -> GELU -> conv3x3(hidden[1] -> out)."""
    return nn.Sequential(
        conv3x3(in_channels, hidden[0]),
        nn.GELU(),
        conv3x3(hidden[0], hidden[1]),
        nn.GELU(),
        conv3x3(hidden[1], out_channels),
    )


class ChannelAutoregressiveEntropyModel(nn.Module):
    """Entropy model of ``y`` given the hyperprior's per-element means and scales.

    Args:
        M: channels of ``y``; must be divisible by ``num_slices``.
        num_slices: number of channel slices coded one after the other.
        max_support_slices: at most this many previous slices feed a slice's context.
        global_block_factory: ``factory(context_dim) -> nn.Module`` building each context block's global branch
            (B, context_dim, H, W) -> same (the model passes a VSS block for ``ssm``, a Swin W+SW pair for ``swin``);
            ``None`` uses ``nn.Identity`` (context from the blocks' residual units only). Called once per block,
            i.e. ``2 * num_slices`` times.
        context_dim: channels inside the context blocks.
        hidden: widths of the two hidden layers of the mean, scale and LRP transforms.

    ``param_grid`` (attribute, default None): when set to a power of two, ``slice_params`` rounds mu and scale and
    ``lrp`` its correction to multiples of it, so that tiny floating-point differences between two runs disappear
    (the codec's deterministic mode, see ``models.csm.CSM``).

    Shapes: ``y``, ``latent_means``, ``latent_scales`` are (B, M, H, W).
    """

    def __init__(
        self,
        M=320,
        num_slices=5,
        max_support_slices=5,
        global_block_factory=None,
        context_dim=128,
        hidden=(224, 128),
    ):
        super().__init__()
        if num_slices < 1 or M % num_slices:
            raise ValueError(f"M={M} must be divisible by num_slices={num_slices}")
        if max_support_slices < 0:
            raise ValueError(f"max_support_slices must be >= 0; got {max_support_slices}")
        self.M = M
        self.num_slices = num_slices
        self.max_support_slices = max_support_slices
        self.slice_channels = M // num_slices

        def context_block(channels):
            global_block = global_block_factory(context_dim) if global_block_factory is not None else None
            # The released code wraps each block in a one-element Sequential (keys ``atten_mean.i.0.*``).
            return nn.Sequential(ContextBlock(channels, context_dim, global_block))

        support = [self.support_channels(i) for i in range(num_slices)]
        self.atten_mean = nn.ModuleList(context_block(c) for c in support)
        self.atten_scale = nn.ModuleList(context_block(c) for c in support)
        self.cc_mean_transforms = nn.ModuleList(_param_transform(c, self.slice_channels, hidden) for c in support)
        self.cc_scale_transforms = nn.ModuleList(_param_transform(c, self.slice_channels, hidden) for c in support)
        self.lrp_transforms = nn.ModuleList(
            _param_transform(c + self.slice_channels, self.slice_channels, hidden) for c in support
        )
        # No scale table yet: CompressionModel.update() fills it (and the CDFs) from get_scale_table().
        self.gaussian_conditional = GaussianConditional(None)
        self.param_grid = None

    def support_channels(self, i):
        """Channels of slice ``i``'s support: ``latent_means`` plus the previous slices it sees."""
        return self.M + self.slice_channels * min(i, self.max_support_slices)

    def slice_params(self, i, latent_means, latent_scales, y_hat_slices):
        """Gaussian parameters of slice ``i`` and the mean context that LRP reuses.

        ``y_hat_slices``: the decoded slices 0 .. i-1, each (B, M / num_slices, H, W).
        Returns ``(mu, scale, mean_support)``: ``mu`` and ``scale`` (B, M / num_slices, H, W), ``mean_support``
        (B, support_channels(i), H, W), the mean context block's output.
        """
        previous = y_hat_slices[: min(i, self.max_support_slices)]
        mean_support = self.atten_mean[i](torch.cat([latent_means, *previous], dim=1))
        scale_support = self.atten_scale[i](torch.cat([latent_scales, *previous], dim=1))
        mu = self._snap(self.cc_mean_transforms[i](mean_support))
        return mu, self._snap(self.cc_scale_transforms[i](scale_support)), mean_support

    def lrp(self, i, mean_support, y_hat_slice):
        """Latent residual prediction of slice ``i``: ``y_hat_slice + 0.5 * tanh(lrp_transforms[i](cat(...)))``.

        ``mean_support`` (B, support_channels(i), H, W) from ``slice_params``; ``y_hat_slice`` (B, M / num_slices,
        H, W), the dequantized slice. Returns the corrected slice, same shape.
        """
        residual = self.lrp_transforms[i](torch.cat([mean_support, y_hat_slice], dim=1))
        return y_hat_slice + self._snap(0.5 * torch.tanh(residual))

    def _snap(self, t):
        """``t`` rounded to multiples of ``param_grid`` (exact for a power of two); ``t`` itself when it is None."""
        if self.param_grid is None:
            return t
        return torch.round(t / self.param_grid) * self.param_grid

    def forward(self, y, latent_means, latent_scales):
        """Training / evaluation pass.

        Returns ``(y_hat, y_likelihoods)``, both (B, M, H, W). Likelihoods come from ``gaussian_conditional``
        (uniform noise in training mode, rounding in eval mode); ``y_hat = round(y - mu) + mu`` with a
        straight-through gradient, then LRP.
        """
        self._check_inputs(latent_means, latent_scales, y)
        y_hat_slices, likelihoods = [], []
        for i, y_slice in enumerate(y.split(self.slice_channels, dim=1)):
            mu, scale, mean_support = self.slice_params(i, latent_means, latent_scales, y_hat_slices)
            _, slice_likelihoods = self.gaussian_conditional(y_slice, scale, mu)
            likelihoods.append(slice_likelihoods)
            y_hat_slices.append(self.lrp(i, mean_support, quantize_ste(y_slice - mu) + mu))
        return torch.cat(y_hat_slices, dim=1), torch.cat(likelihoods, dim=1)

    @torch.no_grad()
    def compress(self, y, latent_means, latent_scales):
        """Code ``y`` with rANS: one stream per image holding all slices in order.

        Returns ``(strings, y_hat)``: ``strings`` a list of B ``bytes``, ``y_hat`` (B, M, H, W), exactly what
        ``decompress`` rebuilds from ``strings`` and the same ``latent_means`` / ``latent_scales``.
        """
        self._check_inputs(latent_means, latent_scales, y)
        tables = self._coding_tables()
        encoders = [BufferedRansEncoder() for _ in range(y.size(0))]
        y_hat_slices = []
        for i, y_slice in enumerate(y.split(self.slice_channels, dim=1)):
            mu, scale, mean_support = self.slice_params(i, latent_means, latent_scales, y_hat_slices)
            indexes = self.gaussian_conditional.build_indexes(scale)
            symbols = self.gaussian_conditional.quantize(y_slice, "symbols", mu)
            for encoder, image_symbols, image_indexes in zip(encoders, symbols, indexes):
                encoder.encode_with_indexes(image_symbols.flatten().tolist(), image_indexes.flatten().tolist(), *tables)
            y_hat_slices.append(self.lrp(i, mean_support, self.gaussian_conditional.dequantize(symbols, mu)))
        return [encoder.flush() for encoder in encoders], torch.cat(y_hat_slices, dim=1)

    @torch.no_grad()
    def decompress(self, strings, latent_means, latent_scales):
        """Rebuild ``y_hat`` (B, M, H, W) from ``compress``'s ``strings`` (a list of B ``bytes``).

        CompressAI's rANS decoder neither bounds-checks nor detects corruption (a damaged stream decodes to
        garbage), hence two guards. The stream is zero-padded by one word per symbol, so a truncated stream reads
        zeros rather than foreign memory (an adversarial one could still read further; the file format's CRC is
        the real guard). The decoded symbols are re-encoded and compared with the stream, so any string that is not
        exactly what ``compress`` wrote for the symbols it decodes to raises ``ValueError`` (truncated, corrupted, or
        read with latents whose scales give other coding indexes); this costs one rANS encode, milliseconds, no
        network pass.
        """
        self._check_inputs(latent_means, latent_scales)
        tables = self._coding_tables()
        if not isinstance(strings, (list, tuple)) or len(strings) != latent_means.size(0):
            count = len(strings) if isinstance(strings, (list, tuple)) else type(strings).__name__
            raise ValueError(f"expected a list of {latent_means.size(0)} strings (one per image); got {count}")
        symbols_per_image = self.M * latent_means.size(2) * latent_means.size(3)
        padding = bytes(_WORD_BYTES * (symbols_per_image + 2))
        decoders = []
        for b, string in enumerate(strings):
            if not isinstance(string, bytes):
                raise ValueError(f"string {b} is {type(string).__name__}, not bytes")
            if len(string) < _MIN_STREAM_BYTES or len(string) % _WORD_BYTES:
                raise ValueError(f"string {b} is not a rANS stream: {len(string)} bytes (whole 32-bit words, >= 8)")
            decoder = RansDecoder()
            decoder.set_stream(string + padding)
            decoders.append(decoder)

        coded = [[] for _ in strings]  # per image, per slice: (symbols, indexes), re-encoded below to verify
        y_hat_slices = []
        for i in range(self.num_slices):
            mu, scale, mean_support = self.slice_params(i, latent_means, latent_scales, y_hat_slices)
            indexes = self.gaussian_conditional.build_indexes(scale)
            symbols = []
            for decoder, image_indexes, image_coded in zip(decoders, indexes, coded):
                index_list = image_indexes.flatten().tolist()
                symbol_list = decoder.decode_stream(index_list, *tables)
                image_coded.append((symbol_list, index_list))
                symbols.append(torch.tensor(symbol_list, dtype=torch.int32).view(image_indexes.shape))
            symbols = torch.stack(symbols).to(mu.device)
            y_hat_slices.append(self.lrp(i, mean_support, self.gaussian_conditional.dequantize(symbols, mu)))

        for b, (string, image_coded) in enumerate(zip(strings, coded)):
            encoder = BufferedRansEncoder()
            for symbol_list, index_list in image_coded:
                encoder.encode_with_indexes(symbol_list, index_list, *tables)
            if encoder.flush() != string:
                raise ValueError(
                    f"string {b} is corrupt or does not match these latents: its decoded symbols do not re-encode to it"
                )
        return torch.cat(y_hat_slices, dim=1)

    def _coding_tables(self):
        """(cdfs, cdf_lengths, offsets) as lists for the rANS coder; raise if ``update()`` has not built them."""
        gc = self.gaussian_conditional
        if gc._quantized_cdf.numel() == 0 or gc._offset.numel() == 0 or gc._cdf_length.numel() == 0:
            raise RuntimeError(
                "the Gaussian conditional has no CDF tables: call model.update() before compress/decompress "
                "(or gaussian_conditional.update_scale_table(get_scale_table()) on the entropy model alone)"
            )
        if not gc._quantized_cdf.size(0) == gc._cdf_length.numel() == gc._offset.numel() == gc.scale_table.numel():
            # The coder indexes the CDFs by the scale table without bounds checks: a mismatch would read past them.
            raise RuntimeError(
                f"the Gaussian conditional's tables do not match: {gc._quantized_cdf.size(0)} CDFs, "
                f"{gc._cdf_length.numel()} lengths, {gc._offset.numel()} offsets for {gc.scale_table.numel()} scales "
                "(call model.update(force=True) to rebuild them)"
            )
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    def _check_inputs(self, latent_means, latent_scales, y=None):
        """Raise ValueError unless the hyperprior outputs (and ``y``) are (B, M, H, W) of one shape."""
        expected = latent_means.shape
        if latent_means.dim() != 4 or latent_means.size(1) != self.M:
            raise ValueError(f"latent_means must be (B, {self.M}, H, W); got {tuple(expected)}")
        for name, tensor in (("latent_scales", latent_scales), ("y", y)):
            if tensor is not None and tensor.shape != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; latent_means has {tuple(expected)}")
