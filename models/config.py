"""The configuration that fully describes a CSM-family model: presets are instances of it, checkpoints store it."""

from dataclasses import asdict, dataclass, fields

TRANSFORM_BLOCKS = ("srb", "tcm", "released")
HYPER_BLOCKS = ("srb", "tcm")
CONTEXTS = ("ssm", "swin")
# Fields added after .csm files existed, with the value that reproduces the models made before them.
_ADDED_LATER = {"acp_refine": True, "cnn_depth": 3}


@dataclass(frozen=True)
class CSMConfig:
    """Architecture of a model (defaults: the paper's figure at N=128, M=320).

    Transforms:
        N: half the width of the transforms (blocks run at 2N channels).
        M: channels of the latent y.
        Z: channels of the hyper-latent z.
        blocks_per_stage: blocks in each of the three stages of g_a / g_s and in h_a / h_s.
        transform_block: stage blocks of g_a / g_s: ``srb`` (the paper's State-space Residual Block),
            ``tcm`` (TCM's CNN || Swin block), ``released`` (the authors' code: CNN+Swin blocks in the outer stages,
            CNN+VSS with a channel score in the inner ones).
        hyper_block: blocks of h_a / h_mean_s / h_scale_s: ``srb`` or ``tcm``.
    State-space Residual Block:
        acp: ``adaptive`` (per-image ranking), ``static`` (fixed split after scoring), ``none`` (no scoring).
        acp_ratio: share of channels sent to the CNN branch.
        acp_refine: the ACP's local refinement (conv3x3 -> GELU -> conv3x3) before the channel score.
        cnn_depth: convolutions in the CNN branch's residual block (3 in the figure, 2 like TCM's).
        ssm_branch: False replaces the VSS branch by a CNN one (the "CNN only" ablation).
        fusion: ``conv1x1`` (released code) or ``residual`` (the figure's three-conv block).
        scan_directions: 1, 2 or 4 directions of the 2-D selective scan.
        d_state, ssm_ratio, mlp_ratio: VSS block sizes (mlp_ratio 0 drops the MLP).
        drop_path: stochastic depth inside SRB VSS blocks.
    TCM / Swin blocks:
        head_dims: head dim per stage of g_a (3) then g_s (3).
        window: window of the transform blocks; hyper_head_dim, hyper_window: those of h_a / h_s.
    Entropy model:
        num_slices, max_support_slices: the channel-wise autoregression.
        context: global branch of the context blocks, ``ssm`` (a VSS block) or ``swin`` (W + SW blocks).
        context_dim: channels inside a context block; cc_hidden: hidden widths of mean/scale/LRP transforms.
        context_head_dim, context_window: Swin sizes for ``context="swin"``.
    """

    N: int = 128
    M: int = 320
    Z: int = 192
    blocks_per_stage: int = 2
    transform_block: str = "srb"
    hyper_block: str = "srb"
    acp: str = "adaptive"
    acp_ratio: float = 0.5
    acp_refine: bool = True
    cnn_depth: int = 3
    ssm_branch: bool = True
    fusion: str = "conv1x1"
    scan_directions: int = 4
    d_state: int = 16
    ssm_ratio: float = 2.0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    head_dims: tuple = (8, 16, 32, 32, 16, 8)
    window: int = 8
    hyper_head_dim: int = 32
    hyper_window: int = 4
    num_slices: int = 5
    max_support_slices: int = 5
    context: str = "ssm"
    context_dim: int = 128
    cc_hidden: tuple = (224, 128)
    context_head_dim: int = 16
    context_window: int = 8

    def __post_init__(self):
        checks = (
            ("transform_block", TRANSFORM_BLOCKS),
            ("hyper_block", HYPER_BLOCKS),
            ("context", CONTEXTS),
            ("acp", ("adaptive", "static", "none")),
            ("fusion", ("conv1x1", "residual")),
            ("scan_directions", (1, 2, 4)),
            ("cnn_depth", (1, 2, 3)),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        for name in ("ssm_branch", "acp_refine"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.M % self.num_slices:
            raise ValueError(f"M={self.M} must be divisible by num_slices={self.num_slices}")
        if self.N < 2 or self.N % 2:
            raise ValueError(f"N must be even and >= 2; got {self.N}")
        if len(self.head_dims) != 6 or len(self.cc_hidden) != 2:
            raise ValueError("head_dims needs 6 entries (g_a stages 1-3, g_s stages 1-3), cc_hidden 2")
        # JSON round trips turn tuples into lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "head_dims", tuple(self.head_dims))
        object.__setattr__(self, "cc_hidden", tuple(self.cc_hidden))

    def to_dict(self):
        return asdict(self)

    def identity_dict(self):
        """``to_dict`` without the fields added after the first release while they hold their defaults, so that a
        model named (hashed) before they existed keeps its name."""
        return {k: v for k, v in asdict(self).items() if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}

    @classmethod
    def from_dict(cls, values):
        """Build from a stored dict; unknown keys are an error naming them (a checkpoint from a newer version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)
