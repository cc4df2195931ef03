"""The channel-wise autoregressive entropy model of ``y`` and its context block."""

from .cam import ChannelAutoregressiveEntropyModel
from .context import ContextBlock, ResidualUnit

__all__ = ["ChannelAutoregressiveEntropyModel", "ContextBlock", "ResidualUnit"]
