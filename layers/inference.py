"""Helpers of the CPU inference paths (Winograd convolutions, fused SS2D, folded SRB and TCM block, work by rows).

Each of those paths computes its layer's function with fewer copies or multiplications, and is taken only where
``cpu_inference`` holds; elsewhere (training, CUDA, autocast) the layer runs as written.
"""

import torch
import torch.nn.functional as F

# Pixels per step of the by-rows inference paths (``add_mlp_rows``, SS2D's gate, window attention by windows): one
# step's intermediates (an MLP hidden layer of rows x 4C floats is 2 MB at C = 128) stay in cache.
ROWS_PER_STEP = 1024


def cpu_inference(x, module):
    """Whether ``x`` is on the CPU, CPU autocast is off and nothing needs a gradient (grad mode off, or neither ``x``
    nor any parameter of ``module`` requires one)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def conv1x1_on_parts(weight, bias, parts):
    """A 1x1 convolution of one image's channel concatenation ``cat(parts)`` without making it: ``weight`` (C_out,
    C_in) and ``bias`` (C_out,), ``parts`` (C_i, HW) matrices of any strides whose C_i add up to C_in, in order.
    One accumulating matrix product per part (``addmm(out=)``, which FLOP counters see). Returns (C_out, HW)."""
    out, start = None, 0
    for part in parts:
        columns = weight[:, start : start + part.shape[0]]
        start += part.shape[0]
        out = torch.addmm(bias[:, None], columns, part) if out is None else torch.addmm(out, columns, part, out=out)
    return out


def add_mlp_rows(x, norm, fc1, act, fc2, rows=ROWS_PER_STEP):
    """``x += fc2(act(fc1(norm(x))))`` in place, ``rows`` pixels at a time; ``x`` (..., C) contiguous, channels last;
    ``norm`` a LayerNorm, ``fc1``/``fc2`` Linear layers, ``act`` a GELU. The same function as the layers run one
    after the other on the whole map, without ever holding the 4C-wide hidden layer of every pixel (200 MB for a
    768x512 image at C = 128): one step's hidden layer stays in cache. Returns ``x``."""
    pixels = x.view(-1, x.shape[-1])
    hidden = torch.empty(min(rows, pixels.shape[0]), fc1.out_features, dtype=x.dtype)
    for start in range(0, pixels.shape[0], rows):
        part = pixels[start : start + rows]
        normed = F.layer_norm(part, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        h = torch.addmm(fc1.bias, normed, fc1.weight.t(), out=hidden[: part.shape[0]])
        torch.ops.aten.gelu_(h, approximate=act.approximate)
        part.add_(torch.addmm(fc2.bias, h, fc2.weight.t()))
    return x
