"""The channel-wise autoregressive entropy model of ``y`` and its context block."""

import layers  # noqa: F401  (CompressAI without PyTorch Geometric, before anything imports it)

from .cam import ChannelAutoregressiveEntropyModel
from .context import ContextBlock, ResidualUnit

__all__ = ["ChannelAutoregressiveEntropyModel", "ContextBlock", "ResidualUnit"]
