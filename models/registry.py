"""Presets as data: each name maps to ``CSMConfig`` overrides; ``build_model(name, **overrides)`` builds one."""

from dataclasses import fields

from .config import CSMConfig
from .csm import CSM

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


def list_models():
    """Names of the registered presets."""
    return sorted(PRESETS)


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
    """Build preset ``name`` with config ``overrides`` (e.g. ``build_model("csm", N=64, acp="static")``)."""
    return CSM(preset_config(name, **overrides), preset=name, scan_backend=scan_backend)
