"""Assembled models: ``CSM`` from a ``CSMConfig``, the preset registry, and checkpoint save/load."""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint, unwrap_model
from .config import CSMConfig
from .csm import CSM, PAD_MULTIPLE, ModelNotUpdatedError
from .registry import PRESETS, build_model, list_models, preset_config

__all__ = [
    "CSM",
    "CSMConfig",
    "CheckpointError",
    "ModelNotUpdatedError",
    "PAD_MULTIPLE",
    "PRESETS",
    "build_model",
    "list_models",
    "load_checkpoint",
    "preset_config",
    "read_checkpoint",
    "save_checkpoint",
    "unwrap_model",
]
