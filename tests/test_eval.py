"""eval.py and utils/evaluation.py: real bitstreams, CompressAI-schema JSON, honest averages, clear bad-input errors."""

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compressai.utils.plot.__main__ import parse_json_file
from PIL import Image

import utils.evaluation as evaluation
import utils.metrics as metrics
from models import build_model, save_checkpoint
from utils.evaluation import PeakMemory, evaluate_model, format_table, measure_image, results_document, summarize
from utils.image import load_image, pad_center
from utils.metrics import bpp_from_likelihoods, bpp_from_strings, psnr_8bit
from tests.helpers import eval_main, torch_threads
from utils.rd import load_rd

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"
TINY = {"N": 8, "M": 40, "Z": 16, "context_dim": 16, "cc_hidden": (16, 16), "num_slices": 2}
CROP = (176, 168)  # width, height: above MS-SSIM's 161 px, not multiples of 64 (padded to 192x192)
COMPRESSAI_KEYS = ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")


def tiny_model(seed: int, rate_gain: float = 1.0):
    """An untrained csm-small at test size; rate_gain scales y (g_a's last conv), raising the rate."""
    torch.manual_seed(seed)
    model = build_model("csm-small", **TINY)
    with torch.no_grad():
        model.g_a[-1].weight.mul_(rate_gain)
        model.g_a[-1].bias.mul_(rate_gain)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread (``torch_threads``)."""
    with torch_threads(1):
        yield


def run_eval(*args, cwd):
    """Run eval.py as a user does (one torch thread, see `one_thread`); returns the finished process."""
    command = [sys.executable, str(REPO / "eval.py"), "--threads", "1", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_no_traceback(run):
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two Kodak crops, a low-rate checkpoint a.pth and a high-rate b.pth."""
    if not (KODAK / "kodim01.png").is_file():
        pytest.skip(f"Kodak images not found at {KODAK}")
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    data.mkdir()
    for name in ("kodim01.png", "kodim02.png"):
        with Image.open(KODAK / name) as img:
            left, top = (img.width - CROP[0]) // 2, (img.height - CROP[1]) // 2
            img.crop((left, top, left + CROP[0], top + CROP[1])).save(data / name)
    save_checkpoint(root / "a.pth", tiny_model(0), lmbda=0.0018)
    save_checkpoint(root / "b.pth", tiny_model(1, rate_gain=20.0), lmbda=0.0483)
    return root


@pytest.fixture(scope="module")
def coded(workspace):
    """eval.py with real entropy coding on both checkpoints, given in decreasing-rate order."""
    out = workspace / "coded.json"
    run = run_eval("--checkpoint", workspace / "b.pth", workspace / "a.pth", "--data", workspace / "data",
                   "-o", out, "--per-image", "--save-recon", workspace / "recon", cwd=workspace)
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text()), out, run


def test_coded_results_follow_compressai_schema(coded, workspace):
    document, path, run = coded
    assert_no_traceback(run)
    results = document["results"]
    assert document["rate"] == "entropy-coded"
    assert set(COMPRESSAI_KEYS) <= set(results)
    for key in (*COMPRESSAI_KEYS, "bpp_real", "bpp_est", "psnr-float", "ms-ssim-db", "peak_memory_encode_mib"):
        assert len(results[key]) == 2 and all(math.isfinite(v) for v in results[key]), key
    assert results["bpp"] == results["bpp_real"] and all(v > 0 for v in results["bpp"])
    assert results["round_trip_failures"] == [0, 0]
    assert all(t > 0 for t in results["encoding_time"] + results["decoding_time"])
    # Sorted by bpp: the high-rate checkpoint, given first, comes last; every parallel list follows.
    assert results["bpp"][0] < results["bpp"][1]
    assert results["checkpoint"] == [str(workspace / "a.pth"), str(workspace / "b.pth")]
    assert results["lambda"] == [0.0018, 0.0483]
    assert [c["path"] for c in document["checkpoints"]] == results["checkpoint"]
    assert document["meta"]["software"]["torch"] == torch.__version__
    assert "timing" in document["meta"] and document["meta"]["num_images"] == 2

    psnr_curve = parse_json_file(path, "psnr")  # CompressAI's plot loader
    assert psnr_curve["xs"] == results["bpp"] and psnr_curve["ys"] == results["psnr-rgb"]
    np.testing.assert_allclose(parse_json_file(path, "ms-ssim")["ys"],
                               -10 * np.log10(1 - np.array(results["ms-ssim-rgb"])))
    assert load_rd(path)["bpp"] == results["bpp"]


def test_averages_are_means_of_the_per_image_records(coded):
    document, _, _ = coded
    for i, point in enumerate(document["per_image"]):
        assert point["checkpoint"] == document["results"]["checkpoint"][i]
        assert [r["image"] for r in point["images"]] == ["kodim01.png", "kodim02.png"]
        for key in ("bpp", "bpp_est", "psnr-rgb", "ms-ssim-db", "encoding_time", "decoding_time"):
            mean = sum(r[key] for r in point["images"]) / 2
            assert document["results"][key][i] == pytest.approx(mean, rel=1e-12), key
        for r in point["images"]:
            assert r["round_trip"] is True
            assert r["bpp_real"] == r["num_bytes"] * 8 / (CROP[0] * CROP[1])


def test_table_has_units_and_saved_reconstructions_are_the_measured_ones(coded, workspace):
    document, _, run = coded
    header = next(line for line in run.stdout.splitlines() if line.startswith("checkpoint"))
    for column in ("bpp", "PSNR [dB]", "MS-SSIM [dB]", "enc [s]", "dec [s]", "peak enc [MiB]", "round trip"):
        assert column in header
    assert "ms" not in header.replace("MS-SSIM", "")  # seconds, never milliseconds mislabelled
    assert "a.pth" in run.stdout and "kodim02.png" in run.stdout  # summary and --per-image rows
    for point in document["per_image"]:
        for record in point["images"]:
            recon = load_image(workspace / "recon" / Path(point["checkpoint"]).stem / record["image"])
            original = load_image(workspace / "data" / record["image"])
            assert recon.shape == original.shape
            assert psnr_8bit(original, recon).item() == pytest.approx(record["psnr-rgb"], abs=1e-9)


def test_estimate_only_skips_coding_and_says_so(coded, workspace, capsys):
    out = workspace / "est.json"
    eval_main()(["--checkpoint", str(workspace / "a.pth"), "--data", str(workspace / "data"), "--limit", "1",
                 "--estimate-only", "-o", str(out)])
    stdout = capsys.readouterr().out
    document = json.loads(out.read_text())
    results = document["results"]
    assert document["rate"] == "estimated" and "NO entropy coding" in document["meta"]["rate"]
    assert not {"encoding_time", "decoding_time", "bpp_real", "round_trip_failures"} & set(results)
    assert results["bpp"] == results["bpp_est"]
    coded_record = coded[0]["per_image"][0]["images"][0]  # a.pth, kodim01.png, same forward pass
    assert results["bpp_est"][0] == pytest.approx(coded_record["bpp_est"], rel=1e-5)
    assert "bpp (est.)" in stdout and "enc [s]" not in stdout
    assert parse_json_file(out, "psnr")["xs"] == results["bpp"]


def test_bad_images_and_checkpoints_are_skipped_with_clear_messages(workspace, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "kodim01.png").write_bytes((workspace / "data" / "kodim01.png").read_bytes())
    Image.open(workspace / "data" / "kodim02.png").convert("L").save(data / "gray.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "notes.txt").write_text("not an image")
    good = workspace / "a.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    foreign_pickle = tmp_path / "foreign.pkl"
    foreign_pickle.write_bytes(pickle.dumps({"weights": Path("x")}))
    foreign_weights = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3, 3)}}, foreign_weights)
    out = tmp_path / "out.json"
    run = run_eval("--checkpoint", truncated, good, foreign_pickle, foreign_weights, tmp_path / "missing.pth",
                   "--data", data, "-o", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert_no_traceback(run)
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    for name in ("broken.png", "notes.txt", "truncated.pth", "foreign.pkl", "foreign.pth", "missing.pth"):
        assert any(name in line for line in warnings), name
    assert sum("gray.png: grayscale" in line for line in run.stderr.splitlines()) == 1  # said once
    document = json.loads(out.read_text())
    assert document["meta"]["images"] == ["gray.png", "kodim01.png"]
    assert len(document["meta"]["failed_checkpoints"]) == 4
    assert document["results"]["checkpoint"] == [str(good)]
    assert document["results"]["round_trip_failures"] == [0]


def test_nothing_to_evaluate_is_a_clear_error(workspace, tmp_path, capsys):
    """SystemExit with a message: what the user sees is that one line and a non-zero status, no traceback."""
    main = eval_main()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(workspace / "a.pth"), "--data", str(empty)])
    assert str(exit_info.value).startswith("error: no images")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((workspace / "a.pth").read_bytes()[:5000])
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(truncated), "--data", str(workspace / "data"), "-o", str(tmp_path / "x.json")])
    assert str(exit_info.value) == "error: none of the 1 checkpoint(s) could be evaluated"
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# --- the library, in process ----------------------------------------------------------------------------------------
def test_rates_come_from_the_shared_bpp_functions():
    assert evaluation.bpp_from_strings is metrics.bpp_from_strings
    assert evaluation.bpp_from_likelihoods is metrics.bpp_from_likelihoods
    model = tiny_model(0)
    model.update(force=True)
    torch.manual_seed(2)
    x = torch.rand(1, 3, 70, 100)  # padded to 128x128; rates count the 7000 original pixels
    record, x_hat = measure_image(model, x, 64, PeakMemory(x.device))
    x_padded, _ = pad_center(x, 64)
    with torch.no_grad():
        likelihoods = model(x_padded)["likelihoods"]
    assert record["bpp_real"] == bpp_from_strings(model.compress(x_padded)["strings"], 7000)
    assert record["bpp_est"] == pytest.approx(bpp_from_likelihoods(likelihoods, 7000).item(), rel=1e-6)
    assert x_hat.shape == x.shape and record["round_trip"] is True
    assert math.isnan(record["ms-ssim-rgb"])  # under 161 px: undefined, not a fake number


def test_round_trip_mismatch_is_named_and_counted(tmp_path, capsys):
    model = tiny_model(0)
    model.update(force=True)
    decompress = model.decompress

    def corrupted(strings, shape):
        out = decompress(strings, shape)
        return {**out, "y_hat": out["y_hat"] + 1}

    model.decompress = corrupted
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    records = evaluate_model(model, [tmp_path / "im.png"], torch.device("cpu"))
    assert "ROUND-TRIP MISMATCH on im.png" in capsys.readouterr().err
    assert records[0]["round_trip"] is False and records[0]["round_trip_max_abs_diff"] == pytest.approx(1)
    assert summarize(records)["round_trip_failures"] == 1


def test_summary_document_and_table():
    def record(bpp, psnr, ms, enc):
        return {"bpp": bpp, "bpp_real": bpp, "bpp_est": bpp, "psnr-rgb": psnr, "psnr-float": psnr,
                "ms-ssim-rgb": ms, "ms-ssim-db": -10 * math.log10(1 - ms) if ms == ms else math.nan,
                "encoding_time": enc, "decoding_time": 2 * enc, "round_trip": True,
                "peak_memory_encode_mib": 10 * enc, "peak_memory_decode_mib": None}

    high = summarize([record(1.0, 30.0, 0.9, 1.0), record(3.0, 40.0, math.nan, 3.0)])
    assert (high["bpp"], high["psnr-rgb"], high["encoding_time"], high["decoding_time"]) == (2.0, 35.0, 2.0, 4.0)
    assert high["ms-ssim-rgb"] == 0.9  # NaN (image under 161 px) left out of the mean
    assert high["peak_memory_encode_mib"] == 30.0 and high["peak_memory_decode_mib"] is None
    low = summarize([record(0.5, 28.0, 0.8, 1.0)])
    points = [{"checkpoint": {"path": f"/c/{n}.pth", "lambda": lm}, "summary": s, "records": []}
              for n, lm, s in (("high", 0.05, high), ("low", 0.01, low))]
    document = results_document(points, "csm", "test", False, {})
    assert document["results"]["bpp"] == [0.5, 2.0] and document["results"]["lambda"] == [0.01, 0.05]
    table = format_table(document)
    assert table.index("low.pth") < table.index("high.pth") and "n/a" in table
