"""scripts/study.py (the equal-budget study's commands) and scripts/study_report.py (its table and plots)."""

import json
import math
import subprocess
import sys

import pytest

from scripts import study, study_report
from tests.helpers import REPO


def test_every_model_of_the_study_gets_the_same_recipe(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/study.py", "--dry-run", "--steps", "500", "--runs",
                           str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--train-args",
                           "--threads 1", "--eval-args", "--threads 1"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    trains = [line for line in proc.stdout.splitlines() if "train.py" in line]
    evals = [line for line in proc.stdout.splitlines() if "eval.py" in line]
    assert len(trains) == len(evals) == len(study.MODELS)
    recipe = " ".join(study.RECIPE) + " --lambda 0.013 --epochs 20 --lr_epoch 16 19"
    assert all(recipe in line and line.endswith("--threads 1") for line in trains)
    assert all(line.endswith("--threads 1") for line in evals)


def write_curve(folder, name, points, bpp, psnr):
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "results": {
        "bpp": [bpp], "psnr-rgb": [psnr], "ms-ssim-rgb": [0.9], "encoding_time": [1.0], "decoding_time": [2.0],
        "num_images": [24]}}))
    (folder / "curves").mkdir(exist_ok=True)
    (folder / "curves" / f"{name}.jsonl").write_text("".join(
        json.dumps({"step": step, "seconds": 36.0 * step, "psnr": 20 + step / 100, "bpp_loss": 0.3, "loss": 1.0})
        + "\n" for step in points))


def reference(folder, name, offset):
    """A published curve with PSNR = offset + 10 log10(bpp): PCHIP reproduces it exactly."""
    rates = [0.1, 0.2, 0.4, 0.8, 1.6]
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "results": {
        "bpp": rates, "psnr-rgb": [offset + 10 * math.log10(r) for r in rates]}}))


def test_report_gives_the_gain_over_jpeg_and_webp_and_bd_rates_where_curves_exist(tmp_path):
    results, published = tmp_path / "results", tmp_path / "published"
    results.mkdir()
    reference(published, "jpeg", 30.0)
    reference(published, "webp", 33.0)
    # Every curve is constant + 10 log10(bpp): the gains and the BD-rates are exact.
    write_curve(results, "tcm_lambda0.013", [250, 500], 0.5, 31 + 10 * math.log10(0.5))
    write_curve(results, "tcm_lambda0.05", [250, 500], 1.0, 31.0)
    write_curve(results, "mbt2018-mean_lambda0.013", [250], 0.4, 30 + 10 * math.log10(0.4))
    write_curve(results, "mbt2018-mean_lambda0.05", [250], 0.8, 30 + 10 * math.log10(0.8))
    assert study_report.main(["--results", str(results), "--published", str(published), "--no-macs"]) == 0
    report = (results / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| tcm | 0.013 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:6] == ["500", "5.00"]  # steps, hours (36 s a step)
    assert cells[-2:] == ["+1.00", "-2.00"]  # dB over JPEG and WebP at equal bpp
    assert "dB vs JPEG (published)" in report and "Pillow" not in report  # no classical/ folder here
    bd = next(line for line in report.splitlines() if line.startswith("| mbt2018-mean |") and "%" in line)
    assert [c.strip() for c in bd.strip("|").split("|")][1:] == [
        f"{100 * (10 ** 0.1 - 1):+.1f} %", "+0.0 %", f"{100 * (10 ** 0.3 - 1):+.1f} %"]  # vs tcm, jpeg, webp
    for name in ("curves.png", "rd_kodak.png"):
        assert (results / name).stat().st_size > 10_000


def test_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no <model>_lambda"):
        study_report.main(["--results", str(tmp_path), "--no-macs"])
