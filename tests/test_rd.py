"""utils/rd.py and scripts/plot_rd.py: published BD-rates reproduced, loading variants, plots written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.rd import bd_psnr, bd_rate, bd_rate_curves, bd_rate_files, bd_rate_table, load_rd, load_rd_paths, rd_points

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO.parent / "shared" / "data" / "published_rd"
KODAK = PUBLISHED / "kodak"
needs_published = pytest.mark.skipif(not KODAK.is_dir(), reason=f"published RD data not found at {KODAK}")

# VTM's Kodak PSNR curve (published_rd/kodak/vtm.json), for tests that need no files.
VTM_BPP = [0.0482, 0.1125, 0.2458, 0.4905, 0.8748, 1.4308, 2.3246, 3.6326]
VTM_PSNR = [26.145, 28.493, 31.200, 34.262, 37.420, 40.424, 43.506, 46.592]


@needs_published
def test_tcm_large_vs_vtm_reproduces_published_bd_rate():
    value = bd_rate_files(KODAK / "vtm.json", KODAK / "paper-tcm2023-large_mse.json")
    assert value == pytest.approx(-11.73, abs=0.05)  # LIC_TCM's paper: -11.7 %


@needs_published
def test_elic_vs_vtm_reproduces_published_bd_rate():
    assert bd_rate_files(KODAK / "vtm.json", KODAK / "paper-elic2022_mse.json") == pytest.approx(-7.0, abs=0.05)


def test_curve_against_itself_is_zero():
    assert abs(bd_rate(VTM_BPP, VTM_PSNR, VTM_BPP, VTM_PSNR)) < 1e-9
    assert abs(bd_psnr(VTM_BPP, VTM_PSNR, VTM_BPP, VTM_PSNR)) < 1e-9


def test_rates_scaled_by_0_9_give_minus_10_percent():
    scaled = [0.9 * r for r in VTM_BPP]
    assert bd_rate(VTM_BPP, VTM_PSNR, scaled, VTM_PSNR) == pytest.approx(-10.0, abs=1e-9)
    assert bd_rate(scaled, VTM_PSNR, VTM_BPP, VTM_PSNR) == pytest.approx(100 / 9, abs=1e-9)


def test_quality_shifted_by_half_a_db_gives_bd_psnr_0_5():
    better = [q + 0.5 for q in VTM_PSNR]
    assert bd_psnr(VTM_BPP, VTM_PSNR, VTM_BPP, better) == pytest.approx(0.5, abs=1e-9)
    assert bd_rate(VTM_BPP, VTM_PSNR, VTM_BPP, better) < 0


@needs_published
@pytest.mark.parametrize("name,metric", [
    ("paper-tcm2023-large_mse.json", "psnr-rgb"),
    ("compressai-bmshj2018-hyperprior_mse_cpu.json", "psnr-rgb"),
    ("compressai-cheng2020-anchor_mse_cpu.json", "ms-ssim-rgb"),
    ("jpeg.json", "psnr-rgb"),
])
def test_matches_bjontegaard_package_pchip(name, metric):
    bjontegaard = pytest.importorskip("bjontegaard")
    anchor, test = rd_points(load_rd(KODAK / "vtm.json"), metric), rd_points(load_rd(KODAK / name), metric)
    reference = dict(method="pchip", require_matching_points=False, min_overlap=0)
    assert bd_rate(*anchor, *test) == pytest.approx(bjontegaard.bd_rate(*anchor, *test, **reference), abs=1e-9)
    assert bd_psnr(*anchor, *test) == pytest.approx(bjontegaard.bd_psnr(*anchor, *test, **reference), abs=1e-9)


def test_point_order_duplicates_and_dominated_points_do_not_matter():
    test_bpp, test_psnr = [0.15, 0.3, 0.6, 0.9], [30.0, 32.5, 36.0, 38.0]
    expected = bd_rate(VTM_BPP, VTM_PSNR, test_bpp, test_psnr)
    order = [2, 0, 3, 1]
    # a repeated point, a point with more bits but lower quality, and one with no finite quality
    noisy_bpp = [test_bpp[i] for i in order] + [0.3, 0.7, 0.5]
    noisy_psnr = [test_psnr[i] for i in order] + [32.5, 35.0, float("nan")]
    assert bd_rate(VTM_BPP, VTM_PSNR, noisy_bpp, noisy_psnr) == pytest.approx(expected, abs=1e-12)


def test_errors_for_disjoint_curves_and_too_few_points():
    with pytest.raises(ValueError, match="do not overlap"):
        bd_rate(VTM_BPP, VTM_PSNR, [0.1, 0.2], [50.0, 52.0])
    with pytest.raises(ValueError, match=">= 2"):
        bd_rate(VTM_BPP, VTM_PSNR, [0.5], [34.0])
    with pytest.raises(ValueError, match=">= 2"):
        bd_rate(VTM_BPP, VTM_PSNR, [0.5, 0.6], [34.0, 33.0])  # more bits for less quality: one usable point


def write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_load_rd_accepts_key_variants_extra_fields_and_sorts(tmp_path):
    path = write_json(tmp_path / "ours.json", {
        "name": "ours", "description": "d", "meta": {"anything": 1},
        "results": {"bpp": [0.5, 0.2], "psnr": [33.0, 29.0], "ms-ssim": [0.98, None], "quality": [2, 1],
                    "per_image": {"kodim01": 1}},
    })
    curve = load_rd(path)
    assert curve["name"] == "ours" and curve["bpp"] == [0.2, 0.5] and curve["psnr"] == [29.0, 33.0]
    assert np.isnan(curve["ms-ssim"][0]) and curve["ms-ssim"][1] == 0.98


def test_load_rd_reads_ms_ssim_in_db_and_missing_metrics(tmp_path):
    path = write_json(tmp_path / "db.json", {"results": {"bpp": [0.1, 0.3], "ms-ssim-db-rgb": [10.0, 20.0]}})
    curve = load_rd(path)
    assert curve["name"] == "db" and curve["psnr"] is None
    np.testing.assert_allclose(curve["ms-ssim"], [0.9, 0.99])
    np.testing.assert_allclose(rd_points(curve, "ms-ssim-rgb")[1], [10.0, 20.0])
    with pytest.raises(ValueError, match="no psnr"):
        rd_points(curve, "psnr-rgb")


def test_load_rd_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="short.json"):
        load_rd(write_json(tmp_path / "short.json", {"results": {"bpp": [0.1, 0.2], "psnr-rgb": [30.0]}}))
    with pytest.raises(ValueError, match="schema.json"):
        load_rd(write_json(tmp_path / "schema.json", {"bpp": [0.1]}))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_rd(tmp_path / "broken.json")


def test_load_rd_paths_expands_folders_and_excludes_anchor(tmp_path):
    anchor = write_json(tmp_path / "anchor.json", {"name": "A", "results": {"bpp": VTM_BPP, "psnr-rgb": VTM_PSNR}})
    write_json(tmp_path / "b.json", {"name": "B", "results": {"bpp": [0.2, 0.4], "psnr-rgb": [30.0, 33.0]}})
    (tmp_path / "notes.txt").write_text("ignored")
    assert [c["name"] for c in load_rd_paths([tmp_path], exclude=anchor)] == ["B"]
    rows = bd_rate_table(load_rd(anchor), load_rd_paths([tmp_path]), "psnr-rgb")
    assert rows[0] == {"name": "A", "bd_rate": pytest.approx(0.0, abs=1e-9), "note": None}
    assert rows[1]["bd_rate"] == pytest.approx(bd_rate_curves(load_rd(anchor), load_rd(tmp_path / "b.json")))


@needs_published
def test_plot_rd_writes_png_and_pdf_with_bd_rates(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "plot_rd.py"), str(KODAK / "paper-tcm2023-large_mse.json"),
               str(KODAK / "compressai-cheng2020-anchor_mse_cpu.json"), "--anchor", str(KODAK / "vtm.json"),
               "-o", str(tmp_path / "plots" / "kodak"), "--title", "Kodak"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "-11.73 %" in run.stdout
    assert "has no ms-ssim-rgb values" in run.stdout  # TCM's file gives PSNR only
    for stem in ("kodak_psnr", "kodak_msssim"):
        assert (tmp_path / "plots" / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / "plots" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "kodak_msssim.pdf", "kodak_msssim.png", "kodak_psnr.pdf", "kodak_psnr.png"]
