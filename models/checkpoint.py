"""Checkpoints: one format that describes itself, one loader that knows every format we accept.

Our format (a dict of tensors and plain types, loadable with ``torch.load(weights_only=True)``)::

    {"format": "csm-checkpoint", "version": 2, "arch": "csm", "preset": str | None, "config": CSMConfig as a dict,
     "lambda": float | None, "state_dict": {...}, ...training state added by train.py...}

or, for a CompressAI architecture (``registry.build_compressai_model``), ``"arch": "compressai:<arch>"`` and
``"arch_args": {constructor argument: value}`` instead of ``preset`` and ``config``. Version 1 (before CompressAI
architectures) had no ``arch`` and is read as ``"csm"``; version-2 CSM files still hold ``preset`` and ``config``, so
code that reads version 1 reads them too.

``load_checkpoint`` also accepts CompressAI-style files (a raw state dict, or one wrapped under ``state_dict``,
``network`` or ``model_state_dict``) from DataParallel/DDP (``module.``) or ``torch.compile`` (``_orig_mod.``), and
the authors' released layout (their entropy-model keys sit at top level: mapped under ``entropy_model.``).
"""

import os
import tempfile
from pathlib import Path

import torch

from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel
from compressai.models.utils import remap_old_keys
from compressai.zoo import load_state_dict as compressai_zoo_keys

from .config import CSMConfig
from .csm import CSM
from .registry import CSM_ARCH, architecture, build_model, describe, is_compressai

FORMAT = "csm-checkpoint"
VERSION = 2
WRAPPER_KEYS = ("state_dict", "network", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# The released code (and TCM) keep the entropy model's modules at the top level of the model.
ENTROPY_MODEL_KEYS = (
    "atten_mean.",
    "atten_scale.",
    "cc_mean_transforms.",
    "cc_scale_transforms.",
    "lrp_transforms.",
    "gaussian_conditional.",
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


def save_checkpoint(path, model, lmbda=None, weights_dtype=None, **extra):
    """Write ``model`` (its ``architecture``, lambda, state dict) and ``extra`` plain entries to ``path`` atomically.

    The file is written to a temporary file in the same folder and renamed, so an interrupted save never leaves a
    truncated checkpoint behind. ``weights_dtype=torch.float16`` stores floating-point weights in half precision
    (half the size, for distribution); loading casts them back to the model's dtype.
    """
    model = unwrap_model(model)
    state_dict = model.state_dict()
    if weights_dtype is not None:
        # Parameters only: the constant buffers (likelihood and GDN bounds, pedestals, scale table) keep their
        # precision; a bound of 1e-9 is 0 in float16.
        learned = {name for name, _ in model.named_parameters()}
        state_dict = {k: v.to(weights_dtype) if k in learned and v.is_floating_point() else v
                      for k, v in state_dict.items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        **architecture(model),
        "lambda": None if lmbda is None else float(lmbda),
        "state_dict": state_dict,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a plain file's permissions, not mkstemp's owner-only 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def unwrap_model(model):
    """The model (a CSM or any CompressAI ``CompressionModel``) inside DistributedDataParallel / DataParallel /
    torch.compile wrappers."""
    while not isinstance(model, CompressionModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a compression model, got {type(model).__name__}")
        model = inner
    return model


def read_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file as a dict, safely (``weights_only=True``), with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle needing arbitrary classes, not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first} (it may be truncated, not a PyTorch file, or need unsafe "
            "unpickling, which is refused)"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a dict of weights")
    version = data.get("version", 1)
    if data.get("format") == FORMAT and (not isinstance(version, int) or version > VERSION):
        raise CheckpointError(
            f"checkpoint {path} is format version {version!r}; this code reads versions 1 to {VERSION} (a newer "
            "version of the code wrote it)"
        )
    return data


def checkpoint_arch(data):
    """The architecture a checkpoint dict of our format names: ``"csm"`` (also for version 1) or
    ``"compressai:<arch>"``; None for files of other formats."""
    return data.get("arch", CSM_ARCH) if data.get("format") == FORMAT else None


def extract_state_dict(data, released_layout=True):
    """The model weights of a loaded checkpoint dict in our key layout (wrappers and prefixes removed).

    ``released_layout`` moves the released code's top-level entropy-model keys under ``entropy_model.`` (a CSM's
    layout); False keeps them where they are (CompressAI's architectures have their ``gaussian_conditional`` there).
    """
    state = data
    for key in WRAPPER_KEYS:
        if isinstance(data.get(key), dict):
            state = data[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("no state dict found: expected tensors, or a dict with one of " + ", ".join(WRAPPER_KEYS))
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if released_layout and key.startswith(ENTROPY_MODEL_KEYS):
            key = "entropy_model." + key
        out[key] = value
    return out


def state_dict_for(model, data):
    """The weights of checkpoint dict ``data`` in ``model``'s key layout: ``extract_state_dict``, with the released
    code's entropy-model keys moved for a CSM; for a CompressAI architecture, the older key names of CompressAI's
    pretrained files renamed as its zoo and ``CompressionModel.load_state_dict`` rename them."""
    if isinstance(model, CSM):
        return extract_state_dict(data)
    state_dict = compressai_zoo_keys(extract_state_dict(data, released_layout=False))
    for name, module in model.named_modules():
        if isinstance(module, EntropyBottleneck):
            state_dict = remap_old_keys(name, state_dict)
    return dict(state_dict)


def infer_preset(state_dict):
    """(preset, overrides) for a state dict saved without a config (released / TCM / CompressAI-style files)."""
    try:
        overrides = {
            "N": state_dict["g_a.0.conv1.weight"].shape[0] // 2,
            "M": state_dict["h_a.0.conv1.weight"].shape[1],
            "Z": state_dict["entropy_bottleneck.quantiles"].shape[0],
        }
    except KeyError as exc:
        raise CheckpointError(
            f"cannot tell which model these weights belong to (no key {exc}); pass preset= to load_checkpoint"
        ) from None
    if any(".mambaVC_block." in k for k in state_dict):
        return "csm-ref", overrides
    if any(".trans_block." in k for k in state_dict):
        return "tcm", overrides
    if any(".acp." in k for k in state_dict):
        return "csm", overrides
    raise CheckpointError("cannot tell which model these weights belong to; pass preset= to load_checkpoint")


def describe_mismatch(model, state_dict, limit=12):
    """A readable list of missing, unexpected and wrongly shaped keys (empty string when they match)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    # CDF buffers are resized on load (their size depends on the trained distributions).
    resizable = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if own[k].shape != state_dict[k].shape and not k.endswith(resizable)
    )
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = "\n    ".join(items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title} key(s):\n    {shown}{more}")
    return "\n".join(lines)


# Buffers whose values the architecture fixes (bounds, pedestals, the bottleneck's quantile targets): checkpoints
# exported in float16 before save_checkpoint kept them in float32 hold them rounded (likelihood bounds of 1e-9 as 0,
# which makes a likelihood 0 and a rate infinite); loading keeps the model's own values for those. (Not the scale
# table: update() builds it with the CDF tables, which must keep matching it.)
CONSTANT_BUFFERS = (".bound", ".pedestal", "scale_bound", ".target")


def load_state_dict_checked(model, state_dict, source="checkpoint"):
    """``model.load_state_dict(strict=True)`` with a readable diff instead of PyTorch's wall of keys; constant buffers
    stored in float16 (``CONSTANT_BUFFERS``) keep the model's values."""
    diff = describe_mismatch(model, state_dict)
    if diff:
        raise CheckpointError(f"{source} does not match {describe(model)}:\n{diff}")
    own = model.state_dict()
    state_dict = {k: own[k] if k.endswith(CONSTANT_BUFFERS) and v.dtype == torch.float16 else v
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


def model_from_checkpoint(data, preset=None, scan_backend="auto", source="checkpoint", **overrides):
    """Rebuild the model a loaded checkpoint dict describes and load its weights.

    ``preset`` (a preset or ``compressai:<arch>``) and ``overrides`` build the model for a file without our
    description (a raw state dict: CompressAI-style, released); for our files, ``overrides`` change the stored
    config or constructor arguments.
    """
    arch = checkpoint_arch(data)
    if arch == CSM_ARCH and preset is None:
        try:
            config = CSMConfig.from_dict({**data["config"], **overrides})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid model config ({exc})") from exc
        model = CSM(config, preset=data.get("preset"), scan_backend=scan_backend)
    elif arch is not None and preset is None:
        if not is_compressai(arch) or not isinstance(data.get("arch_args"), dict):
            raise CheckpointError(f"{source}: unknown architecture {arch!r} (or no arch_args): not a model we build")
        try:
            model = build_model(arch, **{**data["arch_args"], **overrides})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: cannot build {arch!r} ({exc})") from exc
    else:
        if preset is None:
            preset, inferred = infer_preset(extract_state_dict(data))
            overrides = {**inferred, **overrides}
        model = build_model(preset, scan_backend=scan_backend, **overrides)
    return load_state_dict_checked(model, state_dict_for(model, data), source)


def load_checkpoint(path, map_location="cpu", preset=None, scan_backend="auto", **overrides):
    """Rebuild and load the model stored in ``path`` (no flags needed for our own checkpoints).

    Returns the model in eval mode; ``model.checkpoint_info`` holds the preset (``compressai:<arch>`` for a CompressAI
    architecture), lambda and training metadata (epoch, step) of the file when present. ``preset``/``overrides``
    are only needed for files without our description.
    """
    data = read_checkpoint(path, map_location)
    model = model_from_checkpoint(data, preset, scan_backend, source=f"checkpoint {path}", **overrides)
    model.checkpoint_info = {
        "path": str(path),
        "preset": model.preset,
        "lambda": data.get("lambda"),
        **{k: data[k] for k in ("epoch", "step") if k in data},
    }
    return model.to(map_location).eval()
