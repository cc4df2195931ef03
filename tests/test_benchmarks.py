"""The benchmark scripts: bench_codec.py times every model against the last (the baseline); model_report.py counts
the selective scan by formula, also where inference would take the fused kernel."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from layers.conv import WinogradConv2d
from layers.ss2d import SS2D
from models import build_model
from scripts import bench_codec, model_report
from tests.helpers import tiny_overrides


def test_bench_codec_reports_times_and_ratios_over_the_baseline(tmp_path, capsys):
    image = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "bench.json"
    bench_codec.main(["--image", str(image), "--models", "csm-lite", "tcm", "--configs", "small",
                      "--repeats", "1", "--threads", "1", "-o", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["padded_size"] == [64, 128]
    (entry,) = report["configs"]
    assert (entry["config"], entry["N"], entry["M"], entry["baseline"]) == ("small", 32, 128, "tcm")
    models = entry["models"]
    assert set(models) == {"csm-lite", "tcm"} and all(m["exact"] and m["compress_s"] > 0 for m in models.values())
    assert report["winograd_convolutions"] in (True, False) and isinstance(report["allocator_env"], dict)
    ratio = entry["ratio_over_baseline"]["csm-lite"]
    assert ratio["compress"] == round(models["csm-lite"]["compress_s"] / models["tcm"]["compress_s"], 3)


def test_model_report_counts_every_scan_and_restores_the_fused_kernel():
    model = build_model("csm", scan_backend="cpu", **tiny_overrides("csm")).eval()
    ss2d = sum(isinstance(m, SS2D) for m in model.modules())
    report = model_report.count_macs(model, 64, 64)
    assert report["scan_calls"] == ss2d > 0 and report["scan_macs_per_pixel"] > 0
    assert SS2D.use_fused_kernel and WinogradConv2d.enabled
    for conv in model.modules():  # plain convolutions again: the count must not change (Winograd's is invisible)
        if isinstance(conv, WinogradConv2d):
            conv.__class__ = torch.nn.Conv2d
    assert model_report.count_macs(model, 64, 64) == report


@pytest.mark.parametrize("name", ["csm", "tcm"])
def test_model_report_counts_inference_as_the_training_path(name):
    """The inference paths (folded SRB and TCM block, Winograd, fused scan) are counted as the layers they compute."""
    model = build_model(name, scan_backend="cpu", **tiny_overrides(name)).eval()
    report = model_report.count_macs(model, 64, 64)
    with torch.enable_grad(), FlopCounterMode(display=False) as flops:
        model(torch.rand(1, 3, 64, 64))
    assert report["macs_per_pixel_counted"] == round(flops.get_total_flops() / 2 / (64 * 64), 1)
