"""scripts/bench_classical.py: real file sizes and 8-bit PSNR of Pillow's codecs, written as loadable RD JSON."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, features

from scripts.bench_classical import average_results
from utils.image import list_images, load_image, to_pil, to_tensor
from utils.metrics import psnr_8bit
from utils.rd import load_rd

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"
QUALITIES = [20, 50, 80]


@pytest.fixture(scope="module")
def bench_output(tmp_path_factory):
    """Run the script on the first Kodak image at 3 qualities; returns (output folder, finished process)."""
    if not KODAK.is_dir():
        pytest.skip(f"Kodak images not found at {KODAK}")
    out = tmp_path_factory.mktemp("classical")
    command = [sys.executable, str(REPO / "scripts" / "bench_classical.py"), "--data", str(KODAK), "--limit", "1",
               "--qualities", *map(str, QUALITIES), "-o", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=out)
    assert run.returncode == 0, run.stderr
    return out, run


def available_codecs() -> list[str]:
    return [codec for codec, feature in (("jpeg", "jpg"), ("webp", "webp"), ("avif", "avif"))
            if features.check(feature)]


@pytest.mark.parametrize("codec", ["jpeg", "webp", "avif"])
def test_rate_and_quality_increase_with_encoder_quality(bench_output, codec):
    out, run = bench_output
    if codec not in available_codecs():
        assert f"no {codec} support" in run.stdout
        pytest.skip(f"this Pillow has no {codec} support")
    curve = load_rd(out / f"{codec}-pillow.json")
    results = json.loads((out / f"{codec}-pillow.json").read_text())["results"]
    assert curve["name"] == f"{codec}-pillow"
    assert results["quality"] == QUALITIES  # sorted by bpp, which rises with quality
    assert all(a < b for a, b in zip(curve["bpp"], curve["bpp"][1:]))
    assert all(a < b for a, b in zip(curve["psnr"], curve["psnr"][1:]))
    assert all(0 < v < 1 for v in curve["ms-ssim"])
    assert all(t > 0 for t in results["encoding_time"] + results["decoding_time"])
    assert f"{codec}-pillow:" in run.stdout


def test_jpeg_bpp_and_psnr_are_those_of_the_real_file(bench_output):
    out, _ = bench_output
    path = list_images(KODAK)[0]
    x = load_image(path)
    buffer = io.BytesIO()
    to_pil(x).save(buffer, format="JPEG", quality=50, subsampling="4:2:0")
    x_hat = to_tensor(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    results = json.loads((out / "jpeg-pillow.json").read_text())["results"]
    index = results["quality"].index(50)
    assert results["bpp"][index] == buffer.tell() * 8 / (x.shape[-2] * x.shape[-1])
    assert results["psnr-rgb"][index] == pytest.approx(psnr_8bit(x, x_hat).item(), abs=1e-12)


def test_average_results_skips_undefined_ms_ssim_and_sorts_by_bpp():
    image = {q: {"bpp": 1.0 / q, "psnr-rgb": 30.0 + q, "ms-ssim-rgb": math.nan, "encoding_time": 0.1,
                 "decoding_time": 0.01} for q in (10, 20)}
    other = {q: dict(image[q], bpp=3.0 / q, **{"ms-ssim-rgb": 0.9}) for q in (10, 20)}
    results = average_results([image, other], [10, 20])
    assert results["quality"] == [20, 10]
    assert results["bpp"] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert results["ms-ssim-rgb"] == [0.9, 0.9]  # the NaN of the small image is left out of the mean
    assert average_results([image], [10])["ms-ssim-rgb"] == [None]
