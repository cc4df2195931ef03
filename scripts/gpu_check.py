"""The GPU check, in one run: build mamba-ssm's kernel for this GPU, show that the ``cuda`` scan backend computes
what the ``torch`` and ``cpu`` backends compute, and time the ``csm``, ``tcm`` and ``csm-lite`` presets. All figures
go to one JSON.

Stages, each guarded so that a failure is recorded and the JSON is rewritten after every stage:

1. ``deps``: install compressai (and pytorch-msssim) from third_party/ into a private folder when they are not
   importable (started in the background, next to the build); ``scripts/fetch_gpu_deps.sh`` fills third_party/.
2. ``build``: ``scripts/build_mamba_kernel.py`` for the local architecture only (about a minute on 16 cores).
3. ``equivalence``: ``cuda``, ``torch`` (float32) and, on the smaller shapes, ``cpu`` against a float64 scan,
   forward and every gradient, at the SS2D shapes of ``csm`` on a 768x512 image (``run_equivalence`` says the
   criterion); ``cuda`` vs ``torch`` element by element with mamba-ssm's test tolerances as information.
4. ``timing``: forward, compress, decompress (768x512) and a training step (batch 8, 256x256) of ``csm`` with the
   ``cuda`` and ``torch`` scan backends and of ``tcm`` (no SSM), medians of 3 after a warm-up, peak GPU memory.

    python scripts/gpu_check.py                  # writes $OUT/gpu_check.json, else results/gpu_check.json
    python scripts/gpu_check.py --dry-run        # no GPU needed: the plan, the build flags, what would be installed
    python scripts/gpu_check.py --smoke          # no GPU needed: stages 3-4 on the CPU at tiny sizes (cpu vs torch)

Exit status: 0 all stages ran and the backends agree; 1 something failed; 2 no CUDA device.
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts import build_mamba_kernel as kernel_build  # noqa: E402  (needs the repository on sys.path)

THIRD_PARTY = kernel_build.THIRD_PARTY
DEFAULT_SITE = Path("/tmp/csm_gpu_site")  # private install folder: the machine's own packages stay untouched
COMPRESSAI_SDIST = THIRD_PARTY / "sdist" / "compressai-1.2.8.tar.gz"
KODAK_IMAGE = THIRD_PARTY / "images" / "kodim01.png"


@dataclass(frozen=True)
class Plan:
    """What the equivalence and timing stages run, and where.

    The GPU plan: the SS2D scans of csm (N=128, M=320) on a 768x512 image, as (name, d_inner, L). SRB VSS branches
    see half of the 2N = 256 block channels, so d_inner = 2 * 128; g_a / g_s stages run at 384x256, 192x128 and
    96x64, the hyper transforms' blocks at 24x16 and the entropy model's context blocks (context_dim 128) at 48x32.
    Batch 1, K = 4 directions, d_state 16. The timing stage checks these against the shapes the model really scans.
    The cpu backend is compared on the shorter scans, for time.
    """

    device: str = "cuda"
    scan_cases: tuple = (
        ("stage1", 256, 98304),
        ("stage2", 256, 24576),
        ("stage3", 256, 6144),
        ("context", 256, 1536),
        ("hyper", 256, 384),
    )
    cpu_cases: tuple = ("stage3", "context", "hyper")
    backends: tuple = ("cuda", "torch")  # the fast backend first; the second is its reference
    presets: tuple = ("csm", "tcm", "csm-lite")  # the first with an SSM gives the scan shapes; the budget cuts the last
    overrides: tuple = ()  # (name, value) pairs applied to every preset
    image_hw: tuple = (512, 768)  # a landscape Kodak image
    train_batch: int = 8
    train_size: int = 256
    repeats: int = 3


# --smoke: the same code paths on the CPU in seconds, with the compiled cpu backend standing in for cuda.
SMOKE_PLAN = Plan(
    device="cpu",
    scan_cases=(("short", 16, 64), ("long", 16, 700)),
    cpu_cases=(),
    backends=("cpu", "torch"),
    presets=("csm-small", "tcm-small"),
    overrides=(("N", 8), ("M", 40), ("Z", 16), ("context_dim", 16), ("cc_hidden", (16, 16)), ("num_slices", 2),
               ("head_dims", (4,) * 6), ("hyper_head_dim", 4), ("context_head_dim", 4)),
    image_hw=(64, 128),
    train_batch=2,
    train_size=64,
    repeats=1,
)
SCAN_BATCH, SCAN_DIRECTIONS, SCAN_STATE = 1, 4, 16

# mamba-ssm's tests/ops/test_selective_scan.py, float32: (rtol, atol) of the output and of each gradient.
RTOL, ATOL = 6e-4, 2e-3
RTOLW, ATOLW = 1e-3, 1e-3
TOLERANCES = {
    "out": (RTOL, ATOL),
    "u": (RTOL * 2, ATOL * 2),
    "delta": (RTOL * 5, ATOL * 10),
    "A": (RTOLW, ATOLW * 5),
    "B": (RTOL, ATOL),
    "C": (RTOL, ATOL),
    "D": (RTOLW, ATOLW),
    "delta_bias": (RTOLW, ATOLW),
}
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
STAGES = ("deps", "build", "equivalence", "timing")



class Terminated(Exception):
    """SIGTERM (the driver's timeout) arrived: record it in the running stage and stop."""


_terminating = []  # set by the first SIGTERM; `timeout` signals the child and then its whole process group


def _on_sigterm(signum, frame):
    if not _terminating:
        _terminating.append(time.time())
        raise Terminated("terminated by SIGTERM (time limit of scripts/gpu_check.sh)")


# --- the report --------------------------------------------------------------------------------------------------
class Report:
    """The JSON document, rewritten (atomically) after every stage so that a kill still leaves the figures so far."""

    def __init__(self, path):
        self.path = Path(path)
        self.start = time.perf_counter()
        self.data = {
            "tool": "scripts/gpu_check.py",
            "status": "running",
            "equivalence_passed": None,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": 0.0,
            "env": {},
            "stages": {},
        }

    def elapsed(self):
        return time.perf_counter() - self.start

    def write(self):
        self.data["seconds"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def stage(self, name, fn, *args):
        """Run ``fn(record, *args)``; its exceptions become the stage's ``error``. Returns the stage's record."""
        record = {"ok": False}
        self.data["stages"][name] = record
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            fn(record, *args)
            record["ok"] = record.get("ok_override", True)
            record.pop("ok_override", None)
        except Exception as exc:  # noqa: BLE001 -- every failure is a finding to record, not a crash
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc().splitlines()[-12:]
            if _terminating:  # also when a library wrapped the Terminated exception in its own
                self.data["terminated"] = True
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(f"[gpu_check] {name}: {'ok' if record['ok'] else 'FAILED ' + record.get('error', '')}"
              f" ({record['seconds']} s)", flush=True)
        self.write()
        return record


def default_output():
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else REPO / "results" / "gpu_check.json"


# --- environment -------------------------------------------------------------------------------------------------
def _command_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"


def describe_environment():
    import numpy
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "nvcc": _command_line(["nvcc", "--version"]).splitlines()[-1:] or None,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            nvidia_smi=_command_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"]),
        )
    return env


# --- stage: dependencies -----------------------------------------------------------------------------------------
def _missing_modules():
    return [m for m in ("compressai", "pytorch_msssim") if importlib.util.find_spec(m) is None]


def start_deps_install(site):
    """Start ``pip install --target site`` of what is missing (compressai from its sdist, wheels from third_party/);
    returns (Popen or None, file names, log path). A site left by an earlier run on the same machine is reused."""
    if (site / "compressai").is_dir():
        sys.path.insert(0, str(site))
    missing = _missing_modules()
    if not missing:
        return None, [], None
    files = []
    if "compressai" in missing:
        if not COMPRESSAI_SDIST.exists():
            raise FileNotFoundError(f"no {COMPRESSAI_SDIST}: run `bash scripts/fetch_gpu_deps.sh` where PyPI is")
        files.append(COMPRESSAI_SDIST)
    if "pytorch_msssim" in missing:
        wheels = sorted((THIRD_PARTY / "wheels").glob("pytorch_msssim-*.whl"))
        if not wheels:
            raise FileNotFoundError("no pytorch_msssim wheel in third_party/wheels: run scripts/fetch_gpu_deps.sh")
        files.append(wheels[-1])
    site.mkdir(parents=True, exist_ok=True)
    log = site.parent / f"{site.name}.pip.log"
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
           "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, files)]
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
    return proc, [f.name for f in files], log


def finish_deps(record, pending, site, timeout):
    proc, files, log = pending
    record["installed"] = files
    if proc is not None:
        rc = proc.wait(timeout=timeout)
        record["pip_log_tail"] = Path(log).read_text().splitlines()[-8:]
        if rc != 0:
            raise RuntimeError(f"pip install exited with {rc} (log: {log})")
        if str(site) not in sys.path:
            sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    import compressai
    import numpy

    record["compressai"] = compressai.__version__
    record["compressai_path"] = str(Path(compressai.__file__).parent)
    record["numpy"] = numpy.__version__


def start_cpu_extension_build():
    """Build (or find cached) the ``cpu`` scan backend's extension in a child process, next to the CUDA build."""
    code = "from layers.scan import cpu; cpu.load_extension()"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


# --- stage: build ------------------------------------------------------------------------------------------------
def run_build(record, args):
    info = kernel_build.build_kernel(args.sdist, args.arch, args.build_dir, args.max_jobs, verbose=args.verbose)
    record.update(info)
    from layers.scan import resolve_backend

    record["resolved_backend"] = resolve_backend("cuda")  # what "auto" picks for CUDA tensors: must be "cuda"
    from layers.scan import cuda as scan_cuda

    record["kernel_module"] = scan_cuda.load_kernel().__file__


# --- stage: equivalence ------------------------------------------------------------------------------------------
def make_scan_inputs(d_inner, length, device, seed):
    """Random inputs as mamba-ssm's selective-scan test draws them, at SS2D's layout: B, C (batch, K, N, L)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    channels = SCAN_DIRECTIONS * d_inner

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    return {
        "u": randn(SCAN_BATCH, channels, length),
        "delta": 0.5 * rand(SCAN_BATCH, channels, length),
        "A": -0.5 * rand(channels, SCAN_STATE),
        "B": randn(SCAN_BATCH, SCAN_DIRECTIONS, SCAN_STATE, length),
        "C": randn(SCAN_BATCH, SCAN_DIRECTIONS, SCAN_STATE, length),
        "D": randn(channels),
        "delta_bias": 0.5 * rand(channels),
    }


def scan_with_grads(inputs, grad_out, backend):
    """(y, {name: gradient}) of ``selective_scan`` with ``backend`` for upstream gradient ``grad_out``."""
    from layers.scan import selective_scan

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = selective_scan(*(leaves[k] for k in INPUT_NAMES), delta_softplus=True, backend=backend)
    out.backward(grad_out)
    return out.detach(), {k: leaves[k].grad for k in INPUT_NAMES}


def compare(actual, expected, rtol, atol):
    """torch.allclose's test, with figures: ``worst`` = max |a - e| / (atol + rtol |e|), passing when <= 1."""
    import torch

    a, e = actual.double().to(expected.device), expected.double()
    err = (a - e).abs()
    worst = (err / (atol + rtol * e.abs())).max().item()
    finite = bool(torch.isfinite(a).all().item() and torch.isfinite(e).all().item())
    return {
        "ok": finite and worst <= 1.0,
        "worst": round(worst, 4),
        "max_abs": float(err.max().item()),
        "max_rel": float((err.max() / e.abs().max().clamp_min(1e-30)).item()),
        "ref_max_abs": float(e.abs().max().item()),
        "rtol": rtol,
        "atol": atol,
    }


def compare_results(result, reference):
    (out, grads), (ref_out, ref_grads) = result, reference
    checks = {"out": compare(out, ref_out, *TOLERANCES["out"])}
    for name in INPUT_NAMES:
        checks[f"d{name}"] = compare(grads[name], ref_grads[name], *TOLERANCES[name])
    return checks


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    """Peak GPU memory since the last ``_reset_peak`` (None on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _median_time(fn, device, repeats):
    """Median wall time of ``repeats`` synchronised calls (the caller has already run one as a warm-up)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 5), [round(t, 5) for t in times]


def _to_cpu(result):
    out, grads = result
    return out.cpu(), {k: v.cpu() for k, v in grads.items()}


def float32_bound(length):
    """Largest accepted error of a float32 scan against the float64 one, relative to the largest reference value.

    A recurrence of L steps in float32 accumulates rounding error growing with L (the first-order bound of a
    recursive sum is (L - 1) * 2^-24 of the summed magnitudes), so long scans are judged against L * 2^-24, and
    short ones against 128 * 2^-24 (7.6e-6).
    """
    return max(length, 128) * 2.0**-24


def accuracy(result, reference, bound):
    """Per tensor: max |a - r| / max |r| against the float64 ``reference``, and whether it is within ``bound``."""
    import torch

    (out, grads), (ref_out, ref_grads) = result, reference
    pairs = {"out": (out, ref_out), **{f"d{k}": (grads[k], ref_grads[k]) for k in INPUT_NAMES}}
    figures = {}
    for name, (a, r) in pairs.items():
        a = a.double().to(r.device)
        finite = bool(torch.isfinite(a).all().item())
        err = float(((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()) if finite else float("inf")
        figures[name] = {"rel_err": err, "ok": finite and err <= bound}
    return figures


def run_equivalence(record, plan, args, report):
    """Every float32 backend against a float64 scan (the torch backend in float64, on the same device), at every
    scan case; ``plan.backends[0]`` vs ``plan.backends[1]`` element by element with mamba-ssm's test tolerances as
    information; the cpu backend too on ``plan.cpu_cases``.

    Pass/fail is the float64 comparison: every backend's error, relative to the largest reference value, within
    ``float32_bound(L)``. mamba-ssm's element-wise tolerances are made for L <= 4096 and bounded inputs; with its
    test's input distribution (A near 0: almost no decay) the state grows with L, and two correct float32 scans
    differ by more than those tolerances at L = 98304 (seen on an H200: 6.6e-4 of the output's scale).
    """
    import torch

    fast, other = plan.backends
    cases, all_ok = [], True
    record["cases"] = cases
    record["compared"] = f"{fast}, {other} (and cpu on {list(plan.cpu_cases)}) vs torch in float64"
    record["criterion"] = "max|a - ref64| / max|ref64| <= max(L, 128) * 2^-24 for the output and every gradient"
    record["tolerances"] = {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES.items()}
    for index, (name, d_inner, length) in enumerate(plan.scan_cases):
        bound = float32_bound(length)
        case = {"name": name, "bound": bound,
                "shape": {"batch": SCAN_BATCH, "K": SCAN_DIRECTIONS, "d_inner": d_inner,
                          "channels": SCAN_DIRECTIONS * d_inner, "d_state": SCAN_STATE, "L": length}}
        cases.append(case)
        if report.elapsed() > args.budget_s:
            case["skipped"] = "time budget"
            all_ok = False
            continue
        inputs = make_scan_inputs(d_inner, length, plan.device, seed=index)
        gen = torch.Generator(device=plan.device).manual_seed(1000 + index)
        grad_out = torch.randn(SCAN_BATCH, SCAN_DIRECTIONS * d_inner, length, device=plan.device, generator=gen)
        ref64 = scan_with_grads({k: v.double() for k, v in inputs.items()}, grad_out.double(), "torch")
        results = {b: scan_with_grads(inputs, grad_out, b) for b in plan.backends}
        case["accuracy"] = {b: accuracy(r, ref64, bound) for b, r in results.items()}
        case[f"{fast}_vs_{other}"] = compare_results(results[fast], results[other])
        if name in plan.cpu_cases and "cpu" not in plan.backends:
            try:
                cpu_result = scan_with_grads({k: v.cpu() for k, v in inputs.items()}, grad_out.cpu(), "cpu")
                case["accuracy"]["cpu"] = accuracy(cpu_result, ref64, bound)
                case[f"cpu_vs_{fast}"] = compare_results(cpu_result, _to_cpu(results[fast]))
            except Exception as exc:  # noqa: BLE001 -- a missing cpu backend fails this case, not the stage
                case["accuracy"]["cpu"] = {"error": f"{type(exc).__name__}: {exc}"}
        case["ok"] = all(f.get("ok", False) for per in case["accuracy"].values() for f in per.values()) and all(
            "error" not in per for per in case["accuracy"].values())
        # Forward + backward time of each backend (the runs above were the warm-up).
        for backend in plan.backends:
            _reset_peak(plan.device)
            median, _ = _median_time(lambda b=backend: scan_with_grads(inputs, grad_out, b), plan.device, plan.repeats)
            case[f"{backend}_fwd_bwd_s"] = median
            case[f"{backend}_peak_gib"] = _peak_gib(plan.device)
        all_ok = all_ok and case["ok"]
        del inputs, grad_out, results, ref64
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        report.write()
    record["passed"] = all_ok
    report.data["equivalence_passed"] = all_ok
    record["ok_override"] = all_ok


# --- stage: timing -----------------------------------------------------------------------------------------------
def load_test_image(plan):
    """kodim01 when third_party/images has it (cropped to ``plan.image_hw``), else a seeded random image."""
    import torch

    height, width = plan.image_hw
    if KODAK_IMAGE.exists():
        from utils.image import load_image

        x, source = load_image(KODAK_IMAGE), str(KODAK_IMAGE.relative_to(REPO))
        if x.shape[-2] > x.shape[-1]:  # portrait: turn it to the landscape layout
            x = x.transpose(-2, -1)
        x = x[..., :height, :width].contiguous()
    else:
        x, source = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)), "random"
    if tuple(x.shape[-2:]) != (height, width):
        raise ValueError(f"test image {source} is {tuple(x.shape[-2:])}, smaller than {plan.image_hw}")
    return x.to(plan.device), source


def train_crops(x, batch, size):
    """``batch`` deterministic ``size`` x ``size`` crops of a 1x3xHxW image, from its corners and edges."""
    import torch

    height, width = x.shape[-2:]
    rows = max(1, batch // 2)
    tops = [i * (height - size) // max(1, rows - 1) for i in range(rows)]
    crops = [x[..., t:t + size, left:left + size] for t in tops for left in (0, width - size)]
    return torch.cat(crops[:batch]).contiguous()


def model_scan_shapes(model, x):
    """The (d_inner, L) pairs that the model's SS2D modules scan for input ``x`` (one no-grad forward)."""
    import torch

    from layers.ss2d import SS2D

    shapes = set()

    def record(module, inputs):  # SS2D input: (B, H, W, C)
        shapes.add((module.d_inner, inputs[0].shape[1] * inputs[0].shape[2]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, SS2D)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(shapes, key=lambda s: -s[1])


def _measure(fn, plan):
    """(warm-up result, {"median_s", "runs_s", "peak_gib"}) of ``fn``: one warm-up, then ``plan.repeats`` runs."""
    _reset_peak(plan.device)
    result = fn()
    median, runs = _median_time(fn, plan.device, plan.repeats)
    return result, {"median_s": median, "runs_s": runs, "peak_gib": _peak_gib(plan.device)}


def time_inference(model, x, plan):
    """forward / compress / decompress figures, the rate, the PSNR and whether the latents decode exactly."""
    import torch

    from utils.metrics import psnr

    model.eval()
    figures = {}
    with torch.no_grad():
        out, figures["forward"] = _measure(lambda: model(x), plan)
        coded, figures["compress"] = _measure(lambda: model.compress(x), plan)
        decoded, figures["decompress"] = _measure(lambda: model.decompress(coded["strings"], coded["shape"]), plan)
    figures["bytes"] = sum(len(s) for strings in coded["strings"] for s in strings)
    figures["bpp"] = round(figures["bytes"] * 8 / (x.shape[-2] * x.shape[-1]), 4)
    figures["psnr_db"] = round(float(psnr(decoded["x_hat"], x)[0]), 3)
    figures["y_hat_exact"] = bool(torch.equal(coded["y_hat"], decoded["y_hat"]))
    return out, figures


def time_training(model, x_train, plan):
    """One training step as train.py runs it: forward, RD loss, backward, clipping, Adam on main and aux params."""
    from utils.training import RateDistortionLoss, configure_optimizers, train_step

    model.train()
    criterion = RateDistortionLoss(lmbda=0.013)
    optimizer, aux_optimizer = configure_optimizers(model)

    def step():
        return train_step(model, x_train, criterion, optimizer, aux_optimizer)

    values, figures = _measure(step, plan)
    return {**figures, "finite": values["finite"], "batch": list(x_train.shape)}


def run_timing(record, plan, args, report):
    """Every preset of the plan with each scan backend (once for presets without SSM), on the same weights."""
    import torch

    from layers.ss2d import SS2D
    from models import build_model, list_models

    unknown = sorted(set(plan.presets) - set(list_models()))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(list_models())}")
    x, source = load_test_image(plan)
    x_train = train_crops(x, plan.train_batch, plan.train_size)
    record["image"] = {"source": source, "shape": list(x.shape)}
    runs = record["runs"] = []
    all_ok = True
    for preset in plan.presets:
        torch.manual_seed(0)
        model = build_model(preset, **dict(plan.overrides)).to(plan.device)
        model.update(force=True)
        has_ssm = any(isinstance(m, SS2D) for m in model.modules())
        if has_ssm and "scan_shapes" not in record:  # the first preset with an SSM
            shapes = model_scan_shapes(model.eval(), x)
            record["scan_shapes"] = {"preset": preset, "shapes": [{"d_inner": d, "L": n} for d, n in shapes]}
            record["scan_cases_cover_model"] = set(shapes) <= {(d, n) for _, d, n in plan.scan_cases}
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        outputs = {}
        for backend in plan.backends if has_ssm else ("none",):
            entry = {"preset": preset, "scan_backend": backend,
                     "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
            runs.append(entry)
            if report.elapsed() > args.budget_s:
                entry["skipped"] = "time budget"
                all_ok = False
                continue
            try:
                if has_ssm:
                    model.scan_backend = backend
                model.load_state_dict(state)  # the same weights for every backend (a training step changes them)
                outputs[backend], entry["inference"] = time_inference(model, x, plan)
                entry["train_step"] = time_training(model, x_train, plan)
            except Exception as exc:  # noqa: BLE001 -- record and go on with the next configuration
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc().splitlines()[-6:]
                all_ok = False
            report.write()
        if len(outputs) == 2:  # the same weights through both scan backends: the whole model must agree too
            a, b = (outputs[k] for k in plan.backends)
            record[f"{preset}_forward_{'_vs_'.join(plan.backends)}"] = {
                "x_hat_max_abs": float((a["x_hat"] - b["x_hat"]).abs().max()),
                "y_likelihoods_max_abs": float((a["likelihoods"]["y"] - b["likelihoods"]["y"]).abs().max()),
                # An untrained model puts many latents near a rounding boundary: a float32-sized difference flips
                # round(y - mu) there, and that element's likelihood changes completely. The fraction says how many.
                "y_likelihoods_differing_fraction": float(
                    ((a["likelihoods"]["y"] - b["likelihoods"]["y"]).abs() > 1e-3).double().mean()),
                "x_hat_mean_abs": float((a["x_hat"] - b["x_hat"]).abs().mean()),
            }
        del model, outputs, state
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    record["ok_override"] = all_ok


# --- main --------------------------------------------------------------------------------------------------------
def dry_run(report, plan, args):
    """What a GPU run would do, without a GPU: the sdist and build flags, the deps to install, the plan."""
    import torch

    record = report.data["dry_run"] = {"ok": True}
    arch = kernel_build.normalise_arch(args.arch or os.environ.get(kernel_build.ARCH_ENV) or "90")
    try:
        sdist = kernel_build.find_sdist(args.sdist)
        spec = kernel_build.read_build_spec(sdist)
        record["build"] = {
            "sdist": str(sdist),
            "sources": spec["sources"],
            "from_setup_py": spec["from_setup_py"],
            "arch": f"sm_{arch}",
            "nvcc_flags": kernel_build.nvcc_flags(spec, arch, torch.__version__),
            "cxx_flags": kernel_build.cxx_flags(spec, torch.__version__),
        }
    except kernel_build.BuildError as exc:
        record.update(ok=False, build={"error": str(exc)})
    record["deps_to_install"] = _missing_modules()
    record["compressai_sdist_present"] = COMPRESSAI_SDIST.exists()
    record["image"] = str(KODAK_IMAGE.relative_to(REPO)) if KODAK_IMAGE.exists() else "random"
    report.data["status"] = "dry_run"
    report.write()
    return 0


def summary(data):
    """A few lines for the log's tail: status, build, each equivalence case, the timing medians."""
    lines = [f"status {data['status']}, equivalence_passed {data['equivalence_passed']}, {data['seconds']} s, "
             f"{data['env'].get('gpu', data['env'].get('torch'))}"]
    for name, stage in data["stages"].items():
        lines.append(f"  {name}: {'ok' if stage.get('ok') else 'FAILED'} {stage.get('seconds', '')} s "
                     f"{stage.get('error', '')}".rstrip())
    for case in data["stages"].get("equivalence", {}).get("cases", []):
        worst = {k: max((c.get("worst", float("inf")) for c in v.values()), default=None)
                 for k, v in case.items() if "_vs_" in k and "error" not in v}
        times = {k: v for k, v in case.items() if k.endswith("_fwd_bwd_s")}
        errors = {b: max((f.get("rel_err", float("inf")) for f in per.values()), default=None)
                  for b, per in case.get("accuracy", {}).items()}
        lines.append(f"  {case['name']} L={case['shape']['L']}: ok={case.get('ok')} rel_err vs float64 {errors} "
                     f"(bound {case.get('bound', 0):.2e}) element-wise worst {worst} {times}"
                     f"{' ' + case['skipped'] if 'skipped' in case else ''}")
    for run in data["stages"].get("timing", {}).get("runs", []):
        inference = run.get("inference", {})
        medians = {k: inference[k]["median_s"] for k in ("forward", "compress", "decompress") if k in inference}
        train = run.get("train_step", {})
        lines.append(f"  {run['preset']}/{run['scan_backend']}: {medians} train {train.get('median_s')} s "
                     f"peak {train.get('peak_gib')} GiB {run.get('error', run.get('skipped', ''))}".rstrip())
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: $OUT/gpu_check.json, else results/gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: write the plan and build flags")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU needed: run equivalence and timing on the CPU at tiny sizes (cpu vs torch)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no new equivalence case or timing run after this many seconds (default 360)")
    parser.add_argument("--sdist", help="mamba-ssm sdist, directory or .tar.gz (default: third_party/)")
    parser.add_argument("--arch", help=f"CUDA architecture, e.g. 90 (default: ${kernel_build.ARCH_ENV}, else GPU 0's)")
    parser.add_argument("--build-dir", help="kernel build folder (default: build/selective_scan_cuda/...)")
    parser.add_argument("--max-jobs", type=int, help="parallel compile jobs (default: $MAX_JOBS, else all CPUs)")
    parser.add_argument("--site", type=Path, default=DEFAULT_SITE, help="private folder for compressai & co.")
    parser.add_argument("--verbose", action="store_true", help="show the kernel build's compiler output")
    parser.add_argument("--presets", help="comma-separated presets to time, in this order "
                                          "(default: csm,tcm,csm-lite; --smoke: csm-small,tcm-small)")
    args = parser.parse_args(argv)
    if args.presets is not None:  # names checked by the timing stage: models/ needs compressai, which deps installs
        args.presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
        if not args.presets:
            parser.error("--presets: no preset named")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if args.smoke:  # nothing to build or install: the CPU stands in for the GPU
        args.stages = [s for s in args.stages if s in ("equivalence", "timing")]
    args.output = args.output or default_output()
    return args


def run_stages(report, plan, args):
    stages = report.data["stages"]
    # The compressai install and the cpu extension's build run in child processes while the kernel compiles.
    pending = cpu_build = None
    if "deps" in args.stages:
        try:
            pending = start_deps_install(args.site)
        except Exception as exc:  # noqa: BLE001 -- reported by the deps stage below
            pending = exc
    if "equivalence" in args.stages and plan.cpu_cases:
        cpu_build = start_cpu_extension_build()
    if "build" in args.stages:
        report.stage("build", run_build, args)
    if "deps" in args.stages:
        def deps(record):
            if isinstance(pending, Exception):
                raise pending
            finish_deps(record, pending, args.site, timeout=max(60.0, args.budget_s - report.elapsed()))

        report.stage("deps", deps)
    if cpu_build is not None:
        try:
            output, _ = cpu_build.communicate(timeout=max(60.0, args.budget_s - report.elapsed()))
            report.data["env"]["cpu_extension_build"] = {"rc": cpu_build.returncode, "tail": output.splitlines()[-5:]}
        except subprocess.TimeoutExpired:
            cpu_build.kill()
            report.data["env"]["cpu_extension_build"] = {"error": "timed out"}
    ready = all(stages[s]["ok"] for s in ("build", "deps") if s in stages)
    for name, fn in (("equivalence", run_equivalence), ("timing", run_timing)):
        if name not in args.stages or report.data.get("terminated"):
            continue
        if name == "equivalence" and not ready:
            stages[name] = {"ok": False, "error": "not run: the build or deps stage failed"}
            continue
        report.stage(name, fn, plan, args, report)


def main(argv=None):
    args = parse_args(argv)
    plan = SMOKE_PLAN if args.smoke else Plan()
    if args.presets:
        plan = replace(plan, presets=args.presets)
    report = Report(args.output)
    import torch

    report.data["env"] = describe_environment()
    report.data["plan"] = asdict(plan)
    if args.dry_run:
        return dry_run(report, plan, args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        message = (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for "
                   f"CUDA {torch.version.cuda}); run this on a GPU machine, or use --dry-run / --smoke")
        report.data.update(status="no_cuda", error=message)
        report.write()
        print(f"gpu_check: {message}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_stages(report, plan, args)
    except Terminated as exc:  # outside a stage (waiting for a child process)
        report.data.update(terminated=True, error=str(exc))
    ok = not report.data.get("terminated") and all(s["ok"] for s in report.data["stages"].values())
    report.data["status"] = "passed" if ok else "failed"
    report.write()
    print(summary(report.data))
    print(f"[gpu_check] {report.data['status']} in {report.elapsed():.0f} s -> {report.path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
