"""Window attention (Swin) and TCM's CNN + Swin block.

Parameter names and semantics follow TCM (``jmliu206/LIC_TCM``, itself after SCUNet), so the released CSM and TCM
checkpoints load one to one: ``WMSA`` (``embedding_layer``, ``relative_position_params``, ``linear``), the Swin block
(``ln1``, ``msa``, ``ln2``, ``mlp.0``, ``mlp.2``), ``ConvTransBlock`` (``conv1_1``, ``conv_block``, ``trans_block``,
``conv1_2``) and the W + SW pair of the entropy model's context block (``block_1``, ``block_2``).

Maps of any size are accepted. TCM needs H and W to be multiples of the window; here the map is zero-padded up to the
next multiple and cropped back, and the padded positions are masked out as keys, so every real token attends exactly
to the real tokens of its window: the fill value never reaches the output (zero is simply the cheapest), the result on
the real part of a map does not depend on how much padding a size needs, and for multiples of the window nothing
differs from TCM. (Replicate padding, unmasked, would instead give the border tokens extra weight.)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.layers import ResidualBlock, conv1x1

from .inference import ROWS_PER_STEP, add_mlp_rows, conv1x1_on_parts, cpu_inference
from .ss2d import DropPath

WINDOW_TYPES = ("W", "SW")


def _window_partition(x, window):
    """(B, Hp, Wp, C) -> (B, nW, window*window, C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def _window_merge(x, height, width, window):
    """(B, nW, window*window, C) -> (B, Hp, Wp, C): the inverse of ``_window_partition``."""
    batch, _, _, channels = x.shape
    x = x.view(batch, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


class WMSA(nn.Module):
    """Window multi-head self-attention with a learned relative position bias (TCM's ``WMSA``).

    ``type="W"``: attention inside non-overlapping ``window_size`` x ``window_size`` windows. ``type="SW"``: the map
    is first rolled by ``-(window_size // 2)`` in both directions and tokens that were not neighbours before the roll
    (the wrapped-around strips) are masked from each other; the output is rolled back. A map that fits in one window
    is never shifted (the shift could only cut that window into pieces), as in SCUNet/TCM.

    Input: (B, H, W, input_dim), channels last, any H and W (see the module docstring on padding).
    Output: (B, H, W, output_dim). CPU inference attends ``ROWS_PER_STEP`` tokens' windows at a time, so that the
    scores of all windows (400 MB for a 768x512 image's first stage at 128 channels) are never held at once.
    """

    def __init__(self, input_dim, output_dim, head_dim, window_size, type):
        super().__init__()
        if type not in WINDOW_TYPES:
            raise ValueError(f"window type must be one of {WINDOW_TYPES}; got {type!r}")
        if input_dim % head_dim:
            raise ValueError(f"input_dim {input_dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.n_heads = input_dim // head_dim
        self.scale = head_dim**-0.5
        self.window_size = window_size
        self.type = type
        self.embedding_layer = nn.Linear(input_dim, 3 * input_dim)
        # bias[h, dy + w - 1, dx + w - 1] for a query-minus-key offset (dy, dx); TCM's layout (n_heads, 2w-1, 2w-1)
        span = 2 * window_size - 1
        bias = nn.init.trunc_normal_(torch.zeros(self.n_heads, span, span), std=0.02)
        self.relative_position_params = nn.Parameter(bias)
        self.linear = nn.Linear(input_dim, output_dim)

        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        offsets = coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :] + window_size - 1  # (2, P, P)
        # derived from window_size, so kept out of the state_dict (the released checkpoints do not have it)
        self.register_buffer("relative_index", offsets[0] * span + offsets[1], persistent=False)

    def relative_embedding(self):
        """The position bias of every (query, key) pair of a window: (n_heads, P, P), P = window_size**2."""
        return self.relative_position_params.flatten(1)[:, self.relative_index]

    def _mask(self, height, width, padded_height, padded_width, shift, device):
        """Which (query, key) pairs may not attend, per window: (nW, P, P) bool, or None when none are masked.

        Every token gets a label: -1 on padding, else which sides of the roll it came from (rows wrapped around or
        not, columns likewise); only equal labels attend. So real tokens never see padding nor, with a shift, a token
        from across a wrap-around, and every row keeps at least its own token (no all -inf softmax).
        """
        if shift == 0 and (height, width) == (padded_height, padded_width):
            return None
        rows = torch.arange(padded_height, device=device)
        cols = torch.arange(padded_width, device=device)
        if shift:
            # the position each rolled token came from
            rows, cols = (rows + shift) % padded_height, (cols + shift) % padded_width
        padding = (rows[:, None] >= height) | (cols[None, :] >= width)
        wrapped = (rows[:, None] < shift).long() * 2 + (cols[None, :] < shift).long()
        label = torch.where(padding, -1, wrapped)
        label = _window_partition(label[None, :, :, None], self.window_size)[0, :, :, 0]  # (nW, P)
        return label[:, :, None] != label[:, None, :]

    def _attend(self, windows, bias, mask):
        """Attention inside each window and the output projection: windows (B, n, P, C), bias (heads, P, P), mask
        (n, P, P) or None -> (B, n, P, output_dim)."""
        qkv = self.embedding_layer(windows).unflatten(-1, (3 * self.n_heads, self.head_dim))
        q, k, v = qkv.permute(0, 1, 3, 2, 4).chunk(3, dim=2)  # each (B, n, heads, P, head_dim)
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        if mask is not None:
            attn = attn.masked_fill(mask[:, None], float("-inf"))
        return self.linear((attn.softmax(dim=-1) @ v).transpose(2, 3).flatten(-2))

    def forward(self, x):
        batch, height, width, _ = x.shape
        window = self.window_size
        fits_one_window = height <= window and width <= window
        shift = window // 2 if self.type == "SW" and not fits_one_window else 0
        padded_height = -(-height // window) * window
        padded_width = -(-width // window) * window
        x = F.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height))
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))

        windows = _window_partition(x, window)  # (B, nW, P, C)
        mask = self._mask(height, width, padded_height, padded_width, shift, x.device)
        bias = self.relative_embedding()
        if cpu_inference(x, self):  # a few windows at a time: their scores stay in cache
            out = torch.empty(*windows.shape[:-1], self.linear.out_features, dtype=x.dtype)
            step = max(1, ROWS_PER_STEP // windows.shape[2])
            for start in range(0, windows.shape[1], step):
                part = slice(start, start + step)
                out[:, part] = self._attend(windows[:, part], bias, None if mask is None else mask[part])
        else:
            out = self._attend(windows, bias, mask)
        out = _window_merge(out, padded_height, padded_width, window)

        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out[:, :height, :width]


class SwinBlock(nn.Module):
    """Swin transformer block (TCM's ``Block``): ``x + DropPath(WMSA(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``.

    MLP: Linear(d, 4d) -> GELU -> Linear(4d, output_dim). Input (B, H, W, input_dim), channels last, any H and W;
    output (B, H, W, output_dim). The residual needs ``output_dim == input_dim``, as everywhere it is used.
    """

    def __init__(self, input_dim, output_dim, head_dim, window_size, drop_path=0.0, type="W"):
        super().__init__()
        self.ln1 = nn.LayerNorm(input_dim)
        self.msa = WMSA(input_dim, input_dim, head_dim, window_size, type)
        self.drop_path = DropPath(drop_path)
        self.ln2 = nn.LayerNorm(input_dim)
        self.mlp = nn.Sequential(nn.Linear(input_dim, 4 * input_dim), nn.GELU(), nn.Linear(4 * input_dim, output_dim))

    def forward(self, x):
        x = self.drop_path(self.msa(self.ln1(x))).add_(x)
        if not self.training and cpu_inference(x, self):  # the MLP a block of pixels at a time (add_mlp_rows)
            return add_mlp_rows(x.contiguous(), self.ln2, self.mlp[0], self.mlp[1], self.mlp[2])
        return self.drop_path(self.mlp(self.ln2(x))).add_(x)


class ConvTransBlock(nn.Module):
    """TCM's CNN + Swin block on a (B, conv_dim + trans_dim, H, W) map; same shape out.

    ``a, b = split(conv1_1(x))``; ``a = ResidualBlock(a) + a`` (TCM adds the identity a second time on top of the
    residual block's own); ``b = SwinBlock(b)`` (channels last inside); ``x + conv1_2(cat(a, b))``.
    """

    def __init__(self, conv_dim, trans_dim, head_dim, window_size, drop_path=0.0, type="W"):
        super().__init__()
        self.conv_dim, self.trans_dim = conv_dim, trans_dim
        channels = conv_dim + trans_dim
        self.trans_block = SwinBlock(trans_dim, trans_dim, head_dim, window_size, drop_path, type)
        self.conv1_1 = conv1x1(channels, channels)
        self.conv1_2 = conv1x1(channels, channels)
        self.conv_block = ResidualBlock(conv_dim, conv_dim)

    def branches(self, x):
        """The two branches and the output 1x1 conv on an already 1x1-mixed map: the block minus its skip.

        In CPU inference on one image the concatenation is folded into ``conv1_2`` (one matrix product per branch,
        the Swin branch's pixels taken as rows), as the SRB folds its merge into its fusion."""
        batch, _, height, width = x.shape
        a, b = torch.split(x, (self.conv_dim, self.trans_dim), dim=1)
        a = self.conv_block(a).add_(a)
        b = self.trans_block(b.permute(0, 2, 3, 1))  # (B, H, W, trans_dim)
        if batch == 1 and cpu_inference(x, self):
            parts = (a.reshape(self.conv_dim, -1), b.reshape(-1, self.trans_dim).t())
            return conv1x1_on_parts(self.conv1_2.weight.flatten(1), self.conv1_2.bias, parts).view(1, -1, height, width)
        return self.conv1_2(torch.cat((a, b.permute(0, 3, 1, 2)), dim=1))

    def forward(self, x):
        return self.branches(self.conv1_1(x)).add_(x)


class SwinPair(nn.Module):
    """A W block then an SW block on a (B, dim, H, W) map; same shape out.

    The ``swin`` global branch of the entropy model's context block (TCM's ``SwinBlock`` inside ``SWAtten``).
    """

    def __init__(self, dim, head_dim, window_size, drop_path=0.0):
        super().__init__()
        self.block_1 = SwinBlock(dim, dim, head_dim, window_size, drop_path, "W")
        self.block_2 = SwinBlock(dim, dim, head_dim, window_size, drop_path, "SW")

    def forward(self, x):
        return self.block_2(self.block_1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
