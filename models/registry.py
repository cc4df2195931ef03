"""Presets as data: each name maps to ``CSMConfig`` overrides; ``build_model(name, **overrides)`` builds one.

``build_model`` also builds CompressAI's own image architectures by name, ``compressai:<arch>`` (e.g.
``build_model("compressai:mbt2018-mean", N=64, M=96)``), so that baselines train, code and load through the same
pipeline. ``architecture(model)`` is what a checkpoint stores to rebuild either kind.
"""

import inspect
from dataclasses import fields

from compressai.registry import MODELS as COMPRESSAI_MODELS
from compressai.zoo import image_models as compressai_image_models
from compressai.zoo.image import cfgs as compressai_image_widths
from compressai.zoo.image_vbr import cfgs as compressai_vbr_widths

from .config import CSMConfig
from .csm import CSM, PAD_MULTIPLE

CSM_ARCH = "csm"  # the architecture name our checkpoints give every CSMConfig-built model
COMPRESSAI_PREFIX = "compressai:"

# The paper's figure: SRBs everywhere, adaptive ACP, SSM context blocks.
_CSM = {}
# A lighter SRB, not the paper's figure: the ACP keeps its per-image score and routing but loses the local
# refinement (two conv3x3 at full width, about 40 % of an SRB's multiply-adds), the CNN branch has two
# convolutions (TCM's depth) instead of three, and the VSS blocks have no MLP (as in the released code). Its cost
# per block is about that of a TCM block.
_LITE = {"acp_refine": False, "cnn_depth": 2, "mlp_ratio": 0.0}
# A small configuration for CPU training and the bundled checkpoint (same layout, narrower everywhere): 7.7 M
# parameters, of which the entropy model is 2.8 M.
SMALL = {"N": 32, "M": 128, "Z": 64, "num_slices": 4, "context_dim": 48, "cc_hidden": (64, 48)}

PRESETS = {
    "csm": _CSM,
    # The authors' released code (class TCM in their repository): see the spec's "Released-code layout".
    "csm-ref": {
        "transform_block": "released",
        "hyper_block": "tcm",
        "context": "swin",
        "head_dims": (16, 16, 16, 16, 16, 16),
    },
    # The TCM baseline (Liu et al. 2023): CNN || Swin blocks everywhere, Swin context blocks.
    "tcm": {"transform_block": "tcm", "hyper_block": "tcm", "context": "swin"},
    # Ablations of the paper's model.
    "csm-acp-static": {"acp": "static"},
    "csm-acp-none": {"acp": "none"},
    "csm-cnn-only": {"ssm_branch": False},
    "csm-scan1": {"scan_directions": 1},
    "csm-scan2": {"scan_directions": 2},
    "csm-swin-context": {"context": "swin"},
    "csm-fusion-residual": {"fusion": "residual"},
    "csm-lite": _LITE,
    # Small configurations for CPU work.
    "csm-small": SMALL,
    "tcm-small": {**SMALL, "transform_block": "tcm", "hyper_block": "tcm", "context": "swin"},
    "csm-lite-small": {**SMALL, **_LITE},
}


def compressai_architectures():
    """CompressAI's image architectures (its zoo's ``image_models``), without the ``compressai:`` prefix."""
    return sorted(name for name in compressai_image_models if name in COMPRESSAI_MODELS)


def list_models():
    """Names ``build_model`` accepts: the presets, then ``compressai:<arch>`` for every CompressAI architecture."""
    return sorted(PRESETS) + [COMPRESSAI_PREFIX + arch for arch in compressai_architectures()]


def is_compressai(name):
    """Whether a model name (or a checkpoint's ``arch``) names a CompressAI architecture."""
    return isinstance(name, str) and name.startswith(COMPRESSAI_PREFIX)


def compressai_arguments(name):
    """``{argument: default}`` of a CompressAI architecture's constructor: its own defaults, else the widths of
    CompressAI's pretrained model at quality 1 (its lowest rates: ``compressai.zoo`` ``cfgs``)."""
    arch = name[len(COMPRESSAI_PREFIX) :]
    if arch not in compressai_architectures():
        raise ValueError(
            f"unknown model {name!r}: CompressAI's image architectures are "
            + ", ".join(COMPRESSAI_PREFIX + a for a in compressai_architectures())
        )
    widths = compressai_image_widths[arch][1] if arch in compressai_image_widths else compressai_vbr_widths[arch]
    parameters = list(inspect.signature(COMPRESSAI_MODELS[arch].__init__).parameters.values())[1:]
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    defaults = dict(zip((p.name for p in named), widths))  # the zoo passes the widths positionally
    return {p.name: defaults.get(p.name, p.default) for p in named}


def build_compressai_model(name, **kwargs):
    """CompressAI architecture ``name`` (``compressai:<arch>``) with constructor arguments ``kwargs`` (N, M, ...).

    The model is CompressAI's own class (same state-dict keys as its zoo); it gets ``preset`` = ``name`` and
    ``arch_args`` = every constructor argument, defaults included (plain values, stored in checkpoints).
    """
    arguments = compressai_arguments(name)
    unknown = sorted(set(kwargs) - set(arguments))
    if unknown:
        raise ValueError(f"{name} takes no argument(s) {', '.join(unknown)}; its arguments: {', '.join(arguments)}")
    arch_args = {**arguments, **kwargs}
    for key, value in arch_args.items():
        if value is inspect.Parameter.empty:
            raise ValueError(f"{name} needs a value for its argument {key}")
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise ValueError(f"{name}: argument {key}={value!r} is not a plain number, string or None")
    model = COMPRESSAI_MODELS[name[len(COMPRESSAI_PREFIX) :]](**arch_args)
    model.preset, model.arch_args = name, arch_args
    return model


def preset_config(name, **overrides):
    """The ``CSMConfig`` of preset ``name`` with ``overrides`` applied (clear errors for unknown names/keys)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    known = {f.name for f in fields(CSMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for model {name!r}; valid keys: {sorted(known)}")
    return CSMConfig(**{**PRESETS[name], **overrides})


def build_model(name="csm", scan_backend="auto", **overrides):
    """Build preset ``name`` with config ``overrides`` (e.g. ``build_model("csm", N=64, acp="static")``), or the
    CompressAI architecture ``compressai:<arch>`` with constructor arguments ``overrides`` (``scan_backend`` unused:
    it has no selective scan)."""
    if is_compressai(name):
        return build_compressai_model(name, **overrides)
    return CSM(preset_config(name, **overrides), preset=name, scan_backend=scan_backend)


def architecture(model):
    """What a checkpoint stores to rebuild an (unwrapped) model: ``{"arch": "csm", "preset", "config"}`` for a CSM,
    ``{"arch": "compressai:<arch>", "arch_args": {...}}`` for a model of ``build_compressai_model``."""
    if isinstance(model, CSM):
        return {"arch": CSM_ARCH, "preset": model.preset, "config": model.config.to_dict()}
    if is_compressai(getattr(model, "preset", None)) and isinstance(getattr(model, "arch_args", None), dict):
        return {"arch": model.preset, "arch_args": dict(model.arch_args)}
    raise TypeError(
        f"cannot describe a {type(model).__name__} for a checkpoint: build it with build_model (a CSM preset or "
        "compressai:<arch>)"
    )


def describe(model):
    """``'csm-small' (N=32, M=128)``: a model's name and widths, for messages."""
    widths = model.config.to_dict() if isinstance(model, CSM) else getattr(model, "arch_args", {})
    shown = ", ".join(f"{k}={widths[k]}" for k in ("N", "M") if k in widths)
    return f"{getattr(model, 'preset', None) or type(model).__name__!r} ({shown})"


def pad_multiple(model):
    """The multiple that a model's input height and width must be: 64 for a CSM, a CompressAI architecture's
    ``downsampling_factor`` (16 or 64)."""
    return PAD_MULTIPLE if isinstance(model, CSM) else int(getattr(model, "downsampling_factor", PAD_MULTIPLE))
