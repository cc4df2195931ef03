"""Helpers of the CPU inference paths (Winograd convolutions, fused SS2D, folded SRB and TCM block).

Each of those paths computes its layer's function with fewer copies or multiplications, and is taken only where
``cpu_inference`` holds; elsewhere (training, CUDA, autocast) the layer runs as written.
"""

import torch


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
