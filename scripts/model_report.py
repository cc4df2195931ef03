"""Parameters per part and MACs per pixel of CSM-family presets, as JSON.

MACs of convolutions, linear layers, attention and einsums are counted by PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2). The selective scan is invisible to any FLOP counter (it
is a custom kernel), so it is counted by formula per call: 3 multiply-accumulates per (image, channel, state, time
step) (decay * h, B * dt * u, C * h) plus one exp, reported separately.

    python scripts/model_report.py                        # csm, csm-ref, csm-lite, tcm at N=64, 128; 768x512
    python scripts/model_report.py --models csm --N 128 --size 256 256
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import layers.ss2d  # noqa: E402
from layers.conv import WinogradConv2d  # noqa: E402
from models import build_model  # noqa: E402

PARTS = ("g_a", "g_s", "h_a", "h_mean_s", "h_scale_s", "entropy_model", "entropy_bottleneck")
PUBLISHED_PARAMS_M = {"TCM-large": 75.9, "MambaVC": 47.9, "ELIC": 33.3, "csm-ref (released checkpoint)": 82.88}


def count_params(model):
    parts = {p: sum(t.numel() for t in getattr(model, p).parameters()) for p in PARTS}
    parts["h_s (mean + scale)"] = parts["h_mean_s"] + parts["h_scale_s"]
    parts["total"] = sum(t.numel() for t in model.parameters())
    return parts


class ScanCounter:
    """Wraps the selective scan used by SS2D and counts its work by formula."""

    def __init__(self):
        self.macs = 0
        self.exps = 0
        self.calls = 0
        self._original = layers.ss2d.selective_scan

    def __enter__(self):
        def counted(u, delta, A, B, C, *args, **kwargs):
            batch, channels, length = u.shape
            elements = batch * channels * A.shape[1] * length
            self.macs += 3 * elements
            self.exps += elements
            self.calls += 1
            return self._original(u, delta, A, B, C, *args, **kwargs)

        layers.ss2d.selective_scan = counted
        return self

    def __exit__(self, *exc):
        layers.ss2d.selective_scan = self._original


def count_macs(model, height, width):
    """MACs per pixel of one forward pass (eval mode): by part, from the FLOP counter and the scan formula."""
    x = torch.rand(1, 3, height, width)
    pixels = height * width
    # Direct convolutions and unfused scans: FLOP counters see neither NNPACK's Winograd convolution nor the fused
    # SS2D kernel (the multiply-adds reported are the layers', not Winograd's fewer multiplications).
    fused, layers.ss2d.SS2D.use_fused_kernel = layers.ss2d.SS2D.use_fused_kernel, False
    winograd, WinogradConv2d.enabled = WinogradConv2d.enabled, False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops, ScanCounter() as scan:
            model(x)
    finally:
        layers.ss2d.SS2D.use_fused_kernel = fused
        WinogradConv2d.enabled = winograd
    by_module = flops.get_flop_counts()
    counted = {p: sum(by_module.get(f"{type(model).__name__}.{p}", {}).values()) / 2 for p in PARTS}
    if not any(counted.values()):  # module names as reported by this torch version
        counted = {p: sum(by_module.get(p, {}).values()) / 2 for p in PARTS}
    total = sum(by_module.get("Global", {}).values()) / 2
    return {
        "counted_by": "torch.utils.flop_counter.FlopCounterMode (FLOPs/2) + selective scan by formula",
        "macs_per_pixel_counted": round(total / pixels, 1),
        "macs_per_pixel_by_part": {p: round(v / pixels, 1) for p, v in counted.items()},
        "scan_macs_per_pixel": round(scan.macs / pixels, 1),
        "scan_exps_per_pixel": round(scan.exps / pixels, 1),
        "scan_calls": scan.calls,
        "macs_per_pixel_total": round((total + scan.macs) / pixels, 1),
        "kmacs_per_pixel_total": round((total + scan.macs) / pixels / 1e3, 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["csm", "csm-ref", "csm-lite", "tcm"],
                        help="presets to report")
    parser.add_argument("--N", nargs="+", type=int, default=[64, 128], help="values of N to report (M stays 320)")
    parser.add_argument("--size", nargs=2, type=int, default=[512, 768], metavar=("H", "W"), help="input size")
    parser.add_argument("--no-macs", action="store_true", help="parameters only (fast)")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    height, width = args.size
    torch.manual_seed(0)
    report = {"input_size": [height, width], "published_params_M": PUBLISHED_PARAMS_M, "models": []}
    for n in args.N:
        for name in args.models:
            start = time.perf_counter()
            model = build_model(name, N=n).eval()
            params = count_params(model)
            entry = {
                "model": name,
                "N": n,
                "M": model.config.M,
                "params": params,
                "params_M": {k: round(v / 1e6, 3) for k, v in params.items()},
            }
            if not args.no_macs:
                entry["macs"] = count_macs(model, height, width)
            entry["seconds"] = round(time.perf_counter() - start, 1)
            report["models"].append(entry)
            print(f"{name} N={n}: {params['total'] / 1e6:.2f} M parameters", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
