"""scripts/bench_codec.py: one run times every model at each configuration against the last (the baseline)."""

import json

import numpy as np
from PIL import Image

from scripts import bench_codec


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
    ratio = entry["ratio_over_baseline"]["csm-lite"]
    assert ratio["compress"] == round(models["csm-lite"]["compress_s"] / models["tcm"]["compress_s"], 3)
