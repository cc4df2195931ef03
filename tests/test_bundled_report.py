"""scripts/bundled_report.py: the bundled qualities against JPEG's and WebP's published Kodak curves."""

import json
import math

import pytest

from scripts import bundled_report
from utils import bundled


def write_results(path, bpp, psnr):
    path.write_text(json.dumps({"name": path.stem, "results": {
        "bpp": [bpp], "psnr-rgb": [psnr], "ms-ssim-rgb": [0.95], "encoding_time": [1.5], "decoding_time": [1.6],
        "num_images": [24]}}))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Three qualities in tmp_path/checkpoints; published JPEG = 30 + 10 log10(bpp), WebP 2 dB above it (PCHIP over
    log10 bpp reproduces lines exactly)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    table = {q: bundled.Bundled(q, f"m-q{q}.pth.tar", 0.01 * q, f"{q:032x}") for q in (1, 2, 3)}
    monkeypatch.setattr(bundled, "FOLDER", folder)
    monkeypatch.setattr(bundled, "BUNDLED", table)
    monkeypatch.setattr(bundled, "QUALITIES", (1, 2, 3))
    published = tmp_path / "published"
    published.mkdir()
    rates = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    for name, offset in (("jpeg", 30.0), ("webp", 32.0)):
        (published / f"{name}.json").write_text(json.dumps({"name": name, "results": {
            "bpp": rates, "psnr-rgb": [offset + 10 * math.log10(r) for r in rates]}}))
    return folder, published


def test_gains_bd_rates_and_targets(setup):
    folder, published = setup
    for q, bpp in zip((1, 2, 3), (0.1, 0.2, 0.4)):  # 1.5 dB above JPEG's line at each rate
        write_results(folder / f"m-q{q}_kodak.json", bpp, 31.5 + 10 * math.log10(bpp))
    out = bundled_report.report(published)
    assert [p["quality"] for p in out["points"]] == [1, 2, 3]
    assert all(p["db_over_jpeg"] == pytest.approx(1.5) and p["db_over_webp"] == pytest.approx(-0.5)
               for p in out["points"])
    # 1.5 dB on a slope of 10 dB per decade: 10**-0.15 of the rate
    assert out["bd_rate_vs_jpeg_percent"] == pytest.approx(100 * (10**-0.15 - 1), abs=0.01)
    assert out["bd_psnr_vs_jpeg_db"] == pytest.approx(1.5, abs=1e-3)
    assert out["targets"] == {"each_point_1db_over_jpeg": True, "bd_rate_vs_jpeg_below_-20_percent": True}
    write_results(folder / "m-q1_kodak.json", 0.1, 30.8 + 10 * math.log10(0.1))  # 0.8 dB: one point misses
    assert bundled_report.report(published)["targets"]["each_point_1db_over_jpeg"] is False


def test_missing_results_are_a_one_line_error(setup, capsys):
    folder, published = setup
    with pytest.raises(SystemExit) as exc:
        bundled_report.main(["--published", str(published)])
    assert "m-q1_kodak.json: no Kodak results for quality 1" in str(exc.value)
