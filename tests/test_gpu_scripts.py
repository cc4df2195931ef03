"""The GPU scripts where no GPU is: gpu_check.py's no-CUDA answer, dry run and stage logic on the CPU,
build_mamba_kernel.py's reading of the mamba-ssm sdist, and the shell scripts' syntax."""

import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from scripts import build_mamba_kernel as kb
from models import load_checkpoint, read_checkpoint
from scripts import gpu_check, gpu_train, gpu_train_speed
from tests.helpers import REPO

SHELL_SCRIPTS = ("gpu_check.sh", "fetch_gpu_deps.sh", "install_mamba.sh", "gpu_train_speed.sh", "gpu_train.sh")


def _sdist_or_skip():
    try:
        return kb.find_sdist()
    except kb.BuildError:
        pytest.skip("no mamba-ssm sdist in third_party/ (run scripts/fetch_gpu_deps.sh)")


# --- gpu_check.py ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_exits_2_and_says_so(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    data = json.loads(out.read_text())
    assert data["status"] == "no_cuda" and "no CUDA device" in data["error"]
    assert data["env"]["cuda_available"] is False and data["env"]["torch"] == torch.__version__


def test_gpu_check_no_cuda_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "sub" / "check.json"
    assert gpu_check.main(["--output", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert json.loads(out.read_text())["status"] == "no_cuda"


def test_default_output_follows_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).output == tmp_path / "gpu_check.json"
    assert gpu_check.parse_args(["--output", "x.json"]).output.name == "x.json"
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).output == REPO / "results" / "gpu_check.json"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "build,bogus"])


def test_dry_run_reports_the_build(tmp_path):
    out = tmp_path / "dry.json"
    assert gpu_check.main(["--dry-run", "--arch", "9.0", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["status"] == "dry_run"
    assert [tuple(c) for c in data["plan"]["scan_cases"]] == list(gpu_check.Plan().scan_cases)
    build = data["dry_run"]["build"]
    if "error" in build:
        assert "fetch_gpu_deps.sh" in build["error"]
    else:
        assert build["arch"] == "sm_90" and build["nvcc_flags"][-2:] == ["-gencode", "arch=compute_90,code=sm_90"]


def test_plan_matches_the_csm_scan_shapes():
    # csm at 768x512: stages 1-3 at /2, /4, /8; the context blocks at /16, the hyper blocks at /32.
    height, width = gpu_check.Plan().image_hw
    lengths = [height * width // 4**k for k in (1, 2, 3, 4)] + [height * width // 32**2]
    assert [(d, n) for _, d, n in gpu_check.Plan().scan_cases] == [(256, n) for n in lengths]


def test_compare_is_allclose_with_figures():
    expected = torch.tensor([1.0, -2.0, 100.0])
    same = gpu_check.compare(expected.clone(), expected, rtol=1e-3, atol=1e-3)
    assert same["ok"] and same["worst"] == 0 and same["max_abs"] == 0
    # |err| = 0.2 at 100: allclose allows 1e-3 + 1e-3 * 100 = 0.101
    off = gpu_check.compare(expected + torch.tensor([0.0, 0.0, 0.2]), expected, rtol=1e-3, atol=1e-3)
    assert not off["ok"] and off["worst"] == pytest.approx(0.2 / 0.101, rel=1e-3)
    assert off["max_abs"] == pytest.approx(0.2, rel=1e-4) and off["max_rel"] == pytest.approx(0.002, rel=1e-4)
    assert not gpu_check.compare(torch.tensor([float("nan")]), torch.tensor([1.0]), 1.0, 1.0)["ok"]


def test_equivalence_stage_on_the_cpu(tmp_path):
    """The stage's own code, with the torch backend against the float64 reference at a tiny shape."""
    plan = gpu_check.Plan(device="cpu", scan_cases=(("tiny", 4, 40),), cpu_cases=(), backends=("torch", "ref"),
                          repeats=1)
    report = gpu_check.Report(tmp_path / "eq.json")
    args = gpu_check.parse_args(["--output", str(report.path)])
    record = report.stage("equivalence", gpu_check.run_equivalence, plan, args, report)
    assert record["ok"] and record["passed"] and report.data["equivalence_passed"]
    case = json.loads(report.path.read_text())["stages"]["equivalence"]["cases"][0]
    assert set(case["torch_vs_ref"]) == {"out", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"}
    assert all(c["worst"] < 0.1 for c in case["torch_vs_ref"].values())
    assert set(case["accuracy"]) == {"torch", "ref"} and case["bound"] == gpu_check.float32_bound(40)
    assert all(f["ok"] and f["rel_err"] < 1e-5 for per in case["accuracy"].values() for f in per.values())


def test_accuracy_against_float64_fails_a_wrong_scan():
    torch.manual_seed(0)
    names = ("out",) + gpu_check.INPUT_NAMES
    reference = (torch.randn(50).double(), {k: torch.randn(50).double() for k in gpu_check.INPUT_NAMES})
    close = (reference[0].float() * (1 + 1e-7), {k: v.float() for k, v in reference[1].items()})
    assert all(f["ok"] for f in gpu_check.accuracy(close, reference, gpu_check.float32_bound(50)).values())
    wrong = (reference[0].float(), {**close[1], "B": close[1]["B"] + 1e-3})
    figures = gpu_check.accuracy(wrong, reference, gpu_check.float32_bound(50))
    assert [n for n in names if not figures[n if n == "out" else f"d{n}"]["ok"]] == ["B"]
    assert gpu_check.float32_bound(98304) == 98304 * 2.0**-24 and gpu_check.float32_bound(8) == 128 * 2.0**-24


def test_a_failing_stage_is_recorded_not_raised(tmp_path):
    report = gpu_check.Report(tmp_path / "r.json")

    def broken(record):
        raise RuntimeError("boom")

    record = report.stage("build", broken)
    assert not record["ok"] and record["error"] == "RuntimeError: boom"
    assert json.loads(report.path.read_text())["stages"]["build"]["error"] == "RuntimeError: boom"


def test_timing_stage_takes_the_presets_asked_for(tmp_path):
    """--presets replaces the plan's; the scan shapes come from the first preset with an SSM, not the first."""
    args = gpu_check.parse_args(["--smoke", "--stages", "timing", "--presets", "tcm-small, csm-small",
                                 "--output", str(tmp_path / "t.json")])
    assert args.presets == ("tcm-small", "csm-small") and args.stages == ["timing"]
    assert gpu_check.main(["--smoke", "--stages", "timing", "--presets", "tcm-small,csm-small",
                           "--output", str(tmp_path / "t.json")]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["plan"]["presets"] == ["tcm-small", "csm-small"]
    timing = data["stages"]["timing"]
    assert [(r["preset"], r["scan_backend"]) for r in timing["runs"]] == [
        ("tcm-small", "none"), ("csm-small", "cpu"), ("csm-small", "torch")]
    assert timing["scan_shapes"]["preset"] == "csm-small" and "csm-small_forward_cpu_vs_torch" in timing


def test_timing_stage_names_an_unknown_preset(tmp_path):
    assert gpu_check.main(["--smoke", "--stages", "timing", "--presets", "csm-small,nope",
                           "--output", str(tmp_path / "t.json")]) == 1
    error = json.loads((tmp_path / "t.json").read_text())["stages"]["timing"]["error"]
    assert "unknown preset(s) ['nope']" in error and "csm-small" in error
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--presets", " , "])


def test_train_crops_are_slices_of_the_image():
    x = torch.arange(3 * 64 * 128, dtype=torch.float32).view(1, 3, 64, 128)
    crops = gpu_check.train_crops(x, batch=4, size=32)
    assert crops.shape == (4, 3, 32, 32)
    assert torch.equal(crops[0], x[0, :, :32, :32]) and torch.equal(crops[3], x[0, :, 32:, 96:])


# --- build_mamba_kernel.py ---------------------------------------------------------------------------------------
def test_build_spec_read_from_the_sdist():
    sdist = _sdist_or_skip()
    spec = kb.read_build_spec(sdist)
    assert spec["from_setup_py"]
    assert spec["sources"] == kb.FALLBACK_SOURCES
    assert spec["nvcc_flags"] == kb.FALLBACK_NVCC_FLAGS and spec["cxx_flags"] == kb.FALLBACK_CXX_FLAGS
    assert all((sdist / s).is_file() for s in spec["sources"])
    assert spec["include_dirs"] == [str(sdist / "csrc" / "selective_scan")]


def test_nvcc_flags_for_one_arch_and_the_torch_headers():
    spec = {"nvcc_flags": kb.FALLBACK_NVCC_FLAGS, "cxx_flags": kb.FALLBACK_CXX_FLAGS}
    flags = kb.nvcc_flags(spec, "90", "2.11.0+cu130")
    assert flags[-2:] == ["-gencode", "arch=compute_90,code=sm_90"] and flags.count("-gencode") == 1
    assert "-std=c++17" in flags and "--ptxas-options=-v" not in flags
    for needed in ("--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__", "--expt-relaxed-constexpr",
                   "--expt-extended-lambda", "-O3"):
        assert needed in flags
    newer = kb.nvcc_flags(spec, "90", "2.14.1")
    assert "-std=c++20" in newer and "-std=c++17" not in newer
    assert kb.cxx_flags(spec, "2.12.0") == ["-O3", "-std=c++20"]


@pytest.mark.parametrize("arch, expected", [("9.0", "90"), ("90", "90"), ("sm_90", "90"), ((9, 0), "90"),
                                            ("8.6", "86"), ("compute_90a", "90a"), ("12.0", "120")])
def test_normalise_arch(arch, expected):
    assert kb.normalise_arch(arch) == expected


def test_normalise_arch_rejects_nonsense():
    with pytest.raises(kb.BuildError):
        kb.normalise_arch("hopper")


def test_arch_from_the_environment(monkeypatch):
    monkeypatch.setenv(kb.ARCH_ENV, "sm_80")
    assert kb.detect_arch() == "80"


def test_find_sdist_unpacks_a_tarball(tmp_path):
    tarball = tmp_path / "mamba_ssm-0.0.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        data = b"print('setup')\n"
        info = tarfile.TarInfo("mamba_ssm-0.0/setup.py")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    assert kb.find_sdist(tarball) == (tmp_path / "mamba_ssm-0.0").resolve()
    with pytest.raises(kb.BuildError, match="fetch_gpu_deps.sh"):
        kb.find_sdist(tmp_path / "absent")


# --- shell scripts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_shell_script_syntax(name):
    proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- gpu_train_speed.py ------------------------------------------------------------------------------------------
def test_gpu_train_speed_plans_the_issue_configuration_and_stops_at_its_budget(tmp_path, capsys):
    """On the GPU: csm at N=128, batch 8, 256x256 against the baseline; a stage past --budget-s is recorded as not
    started (here all of them, with a budget of 0), and the JSON is written."""
    assert gpu_train_speed.bench_flags(False)[:8] == ["--cuda", "--models", "csm", "--batch-size", "8", "--size",
                                                      "256", "256"]
    out = tmp_path / "speed.json"
    code = gpu_train_speed.main(["--output", str(out), "--budget-s", "0", "--stages", "csm,amp"])
    report = json.loads(out.read_text())
    assert code == 1 and set(report["stages"]) == {"csm", "amp"}
    assert all("not started" in stage["error"] for stage in report["stages"].values())


@pytest.mark.slow
def test_gpu_train_speed_smoke_runs_every_stage_on_the_cpu(tmp_path):
    """--smoke: the side-by-side benchmark against a baseline checkout (this tree itself), the variants and the amp
    check, on the CPU at tiny sizes (several minutes on 2 cores)."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_train_speed.py", "--smoke", "--baseline", str(REPO),
                           "--data", str(shared_data_or_skip()), "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (csm,) = report["stages"]["csm"]["reports"][0]["results"]
    assert csm["time_ratio"] > 0 and csm["baseline"]["peak_rss_gib"] > 0
    assert len(report["stages"]["variants"]["reports"]) == 2  # float32 and tcm (channels_last: CUDA only)
    assert report["stages"]["amp"]["reports"][0]["steps"] == 3


def shared_data_or_skip():
    from tests.helpers import shared_data

    return shared_data("bsds500")


# --- gpu_train.py ------------------------------------------------------------------------------------------------
def test_gpu_train_plans_a_timed_warm_start_and_leaves_time_for_the_evaluation(tmp_path):
    data = shared_data_or_skip()
    init = tmp_path / "init.pth.tar"
    init.write_bytes(b"")
    args = gpu_train.parse_args(["--data", str(data), "--eval-data", str(data / "val"), "--init", str(init)])
    command = gpu_train.train_command(args, tmp_path / "run", 300)
    joined = " ".join(command)
    assert "--cuda" in command and "--patch-size 256 256" in joined and "--lr-time-milestones 0.8 0.93" in joined
    assert command[command.index("--time-limit") + 1] == "300"
    assert command[command.index("--checkpoint") + 1] == str(init)  # weights only: no --resume, Adam afresh
    # A deadline that leaves no time to train: the stage says so, and the report is still written.
    code = gpu_train.main(["--data", str(data), "--eval-data", str(data / "val"), "--out", str(tmp_path / "out"),
                           "--stages", "train", "--deadline-s", str(gpu_train.EVAL_RESERVE_S)])
    report = json.loads((tmp_path / "out" / "gpu_train.json").read_text())
    assert code == 1 and "left for training" in report["stages"]["train"]["error"]


def test_gpu_train_smoke_trains_exports_evaluates_and_warm_starts(tmp_path):
    """--smoke on the CPU: a tiny model trains for a few seconds, comes back as a float16 checkpoint with its Kodak
    point, and a second run starts from that checkpoint (--init)."""
    shared_data_or_skip()

    def smoke(out, *extra):
        proc = subprocess.run([sys.executable, "scripts/gpu_train.py", "--smoke", "--seconds", "4", "--name", "tiny",
                               "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((out / "gpu_train.json").read_text())

    report = smoke(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["gpu_train.json", "tiny.pth.tar", "tiny_eval.log", "tiny_kodak.json", "tiny_metrics.jsonl",
                     "tiny_train.log"]
    train = report["stages"]["train"]
    assert train["steps"] >= 1 and train["time_limit_s"] == 4 and "--time-limit" in train["command"]
    exported = tmp_path / "a" / "tiny.pth.tar"
    assert all(t.dtype == torch.float16 for k, t in read_checkpoint(exported)["state_dict"].items()
               if k.endswith(".weight"))
    load_checkpoint(exported)
    results = json.loads((tmp_path / "a" / "tiny_kodak.json").read_text())["results"]
    assert results["num_images"] == [1] and results["bpp_real"][0] > 0
    assert report["stages"]["eval"]["results"]["bpp_real"] == results["bpp_real"]

    again = smoke(tmp_path / "b", "--init", str(exported), "--stages", "train")
    assert again["init"] == str(exported) and "--checkpoint" in again["stages"]["train"]["command"]
