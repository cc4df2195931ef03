"""The benchmark scripts: bench_codec.py times every model against the last (the baseline); model_report.py counts
the selective scan by formula, also where inference would take the fused kernel; bench_train.py runs any model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from layers.conv import WinogradConv2d
from layers.ss2d import SS2D
from models import build_model
from scripts import bench_codec, bench_train, model_report
from tests.helpers import tiny_overrides, torch_threads


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
    for result in models.values():  # one round: the parts add up to its time (each rounded to 1 ms)
        enc, dec = result["compress_parts_s"], result["decompress_parts_s"]
        assert set(enc) == {"g_a", "h_a", "h_s", "entropy_model", "coding_and_rest"}
        assert set(dec) == {"h_s", "entropy_model", "g_s", "coding_and_rest"}
        assert all(seconds > 0 for seconds in (*enc.values(), *dec.values()))
        assert sum(enc.values()) == pytest.approx(result["compress_s"], abs=0.003)
        assert sum(dec.values()) == pytest.approx(result["decompress_s"], abs=0.003)


def test_part_timer_times_each_call_of_a_part_and_removes_its_hooks(monkeypatch):
    """Two calls of g_a: both counted; nothing else ran; no hook left behind."""
    model = build_model("csm-lite", scan_backend="cpu", **tiny_overrides("csm-lite")).eval()
    ticks = iter(range(100))
    monkeypatch.setattr(bench_codec.time, "perf_counter", lambda: float(next(ticks)))
    with torch.no_grad(), bench_codec.part_timer(model) as seconds:
        model.g_a(torch.rand(1, 3, 64, 64))
        model.g_a(torch.rand(1, 3, 64, 64))
    assert seconds == {"g_a": 2.0, "h_a": 0.0, "h_s": 0.0, "entropy_model": 0.0, "g_s": 0.0}
    assert bench_codec.split_parts(seconds, 5.0) == {"g_a": 2.0, "coding_and_rest": 3.0}
    assert not model.g_a._forward_hooks and not model.g_a._forward_pre_hooks


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


def test_bench_train_times_a_compressai_architecture_at_the_given_widths(capsys):
    bench_train.main(["--models", "compressai:mbt2018-mean", "--N", "8", "--M", "16", "--size", "64", "64",
                      "--steps", "2", "--warmup", "1", "--threads", "1"])
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["model"] == "compressai:mbt2018-mean" and result["overrides"] == {"N": 8, "M": 16}
    assert len(result["step_seconds_per_round"]) == 1 and result["step_seconds_median"] > 0
    assert result["peak_rss_gib"] > 0.1  # the child process's own peak


FAKE_BASELINE = """import json, sys
args = sys.argv[1:]
model = args[args.index("--models") + 1]
assert "--amp" not in args and "--in-process" not in args  # only the flags an older script knows
print("noise before the report")
print(json.dumps({"scan_backend": "cpu", "results": [{"model": model, "batch_size": 1, "step_seconds_median": 4.0,
                                                      "step_seconds_all": [4.0]}]}))
"""


def test_bench_train_takes_turns_with_a_baseline_checkout(tmp_path, capsys):
    """--baseline runs the other checkout's script with the shared flags, alternating with this tree's runs round
    by round, and reports both medians, the ratio and each side's peak memory; -o writes the same JSON."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "bench_train.py").write_text(FAKE_BASELINE)
    out = tmp_path / "report.json"
    bench_train.main(["--models", "csm-small", "--size", "64", "64", "--steps", "1", "--warmup", "1", "--threads",
                      "1", "--amp", "none", "--baseline", str(tmp_path), "--rounds", "2", "-o", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    (result,) = report["results"]
    assert result["baseline"]["step_seconds_per_round"] == [4.0, 4.0] and result["baseline"]["peak_rss_gib"] > 0
    assert len(result["step_seconds_per_round"]) == 2 and result["amp"] == "none"
    assert result["time_ratio"] == round(result["step_seconds_median"] / 4.0, 3)


def test_bench_codec_large_round_trips_a_tiled_image_through_the_cli(tmp_path, capsys):
    """A small synthetic image in tiles of 64 with the bundled model: codec.py encode and decode in their own
    processes, peak RSS and seconds per megapixel, equal latents, and the tiling the file records."""
    from scripts import bench_codec_large

    out = tmp_path / "large.json"
    assert bench_codec_large.main(["--models", "bundled", "--size", "200", "130", "--synthetic", "--tile", "64",
                                   "--threads", "1", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    result = report["models"]["bundled"]
    assert report["megapixels"] == 0.026 and "smooth random image 200x130" in report["image"]
    assert result["latents_equal"] is True and (result["tile"], result["tile_overlap"], result["tiles"]) == (64, 64, 12)
    for step in ("encode", "decode"):
        assert result[step]["peak_rss_mb"] > 100 and result[step]["seconds_per_mp"] > 0
    assert 0 < result["bpp"] < 24 and 5 < result["psnr"] < 60


def test_tiling_seams_pools_errors_near_the_tile_boundaries(tmp_path, capsys):
    from models import save_checkpoint
    from scripts import tiling_seams

    torch.manual_seed(0)
    model = build_model("csm-small", **tiny_overrides("csm-small"))
    checkpoint = save_checkpoint(tmp_path / "tiny.pth.tar", model)
    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 600, 3), dtype=np.uint8)).save(data / "a.png")
    masks = tiling_seams.seam_masks((320, 640), (20, 20, 10, 10), 8)
    assert tuple(masks["512"].shape) == (300, 600) and masks["512"].sum() == 16 * 300 and masks["256"].sum() == 16 * 300 + 16 * 600 - 16 * 16  # x = 256 and y = 256
    out = tmp_path / "seams.json"
    assert tiling_seams.main(["--checkpoint", str(checkpoint), "--data", str(data), "--configs", "0:0", "256:32",
                              "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report and report["images"] == 1
    for config in ("0:0", "256:32"):
        assert all(5 < value < 60 for value in report["psnr_db"][config].values())
