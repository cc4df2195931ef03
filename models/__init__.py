"""Assembled models: ``CSM`` from a ``CSMConfig``, the preset registry (and CompressAI's architectures by name), and
checkpoint save/load."""

import layers  # noqa: F401  (CompressAI without PyTorch Geometric, before anything imports it)

from .checkpoint import (CheckpointError, checkpoint_arch, load_checkpoint, read_checkpoint, save_checkpoint,
                         unwrap_model)
from .config import CSMConfig
from .csm import CSM, PAD_MULTIPLE, ModelNotUpdatedError
from .registry import (COMPRESSAI_PREFIX, PRESETS, architecture, build_model, compressai_architectures,
                       compressai_arguments, is_compressai, list_models, pad_multiple, preset_config)

__all__ = [
    "COMPRESSAI_PREFIX",
    "CSM",
    "CSMConfig",
    "CheckpointError",
    "ModelNotUpdatedError",
    "PAD_MULTIPLE",
    "PRESETS",
    "architecture",
    "build_model",
    "checkpoint_arch",
    "compressai_architectures",
    "compressai_arguments",
    "is_compressai",
    "list_models",
    "load_checkpoint",
    "pad_multiple",
    "preset_config",
    "read_checkpoint",
    "save_checkpoint",
    "unwrap_model",
]
