"""Time, peak memory and error of the selective-scan backends side by side, as JSON.

    python scripts/bench_scan.py                          # torch and cpu (+ cuda when it runs), 2 threads
    python scripts/bench_scan.py --backends cpu --measure-build --threads 1

The SS2D shape of CSM's scans: batch 1, K = 4 directions of D = 256 channels (1024 scanned channels), N = 16
states, at L = 1024, 4096, 16384 (forward and forward + backward) and 98304 (a 768x512 Kodak image at stride 2,
forward only). Inputs follow SS2D's initialisation (A = -(n + 1), dt of delta_bias log-uniform in [1e-3, 0.1], D = 1).
Times are wall-clock seconds, medians of --repeats runs after one warm-up; the process CPU seconds of the same runs
are reported beside them, since a wall time well above cpu_s / threads means other processes shared the cores.
The maximum relative error (max |a - b| / max |b|, over the output and every gradient) is measured against the
float64 reference where it is affordable (L <= --ref-max-length). The issue's targets for the cpu backend at
L = 16384 are checked at the end.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from layers.scan import ScanBackendError, selective_scan, selective_scan_ref  # noqa: E402
from utils.cli import positive_int  # noqa: E402
from utils.evaluation import proc_status_kib, reset_peak_rss  # noqa: E402

LENGTHS = (1024, 4096, 16384)
FORWARD_ONLY_LENGTHS = (98304,)
TARGETS = {"length": 16384, "forward_s": 0.15, "forward_backward_s": 0.5, "extra_peak_bytes": 1 << 30}
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=("torch", "cpu", "cuda"), default=("torch", "cpu", "cuda"),
                        help="backends to run; those that cannot run here are reported as unavailable")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=LENGTHS,
                        help="lengths timed forward and forward + backward (default: %(default)s)")
    parser.add_argument("--forward-only-lengths", nargs="*", type=positive_int, default=FORWARD_ONLY_LENGTHS,
                        help="lengths timed forward only (default: %(default)s)")
    parser.add_argument("--torch-max-length", type=positive_int, default=16384,
                        help="skip the (slow) torch backend above this length (default: %(default)s)")
    parser.add_argument("--ref-max-length", type=int, default=1024,
                        help="compare with the float64 reference up to this length; 0 skips it (default: 1024)")
    parser.add_argument("--measure-build", action="store_true",
                        help="build the cpu extension in a fresh cache (CSM_CACHE_DIR in a temp dir) and time it")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_inputs(length, seed, batch=1, directions=4, channels=256, n_state=16):
    """Float32 (u, delta, A, B, C, D, delta_bias) shaped like an SS2D scan, initialised like SS2D."""
    g = torch.Generator().manual_seed(seed)
    total = directions * channels
    u = torch.randn(batch, total, length, generator=g)
    delta = 0.5 * torch.randn(batch, total, length, generator=g)
    A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(total, 1)
    B = torch.randn(batch, directions, n_state, length, generator=g)
    C = torch.randn(batch, directions, n_state, length, generator=g)
    D = torch.ones(total)
    dt = torch.exp(torch.empty(total).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    return [u, delta, A, B, C, D, delta_bias]


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def release_free_heap():
    """glibc keeps freed blocks below its mmap threshold (up to 32 MB) in the heap, still resident: return them to
    the system so that memory a run reuses from earlier runs counts as new again."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory of this process above its level at the start of a ``with`` block, in bytes.

    Linux: the kernel's high-water mark VmHWM is reset to the current RSS by writing "5" to /proc/self/clear_refs,
    and read from /proc/self/status at the end (exact, no sampling); freed heap memory is released first. CUDA: torch.cuda.max_memory_allocated above
    the memory allocated at the start.
    """

    def __init__(self, device):
        self.device = device
        self.method = (
            "torch.cuda.max_memory_allocated() - memory_allocated() at the start"
            if device == "cuda"
            else "VmHWM after the run - VmRSS before it; VmHWM reset via /proc/self/clear_refs = 5 and free heap "
            "released with malloc_trim(0) before it (Linux); measured on the warm-up run"
        )

    @staticmethod
    def _status(field):
        return proc_status_kib(field) * 1024

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            gc.collect()
            release_free_heap()
            self.start = self._status("VmRSS")
            reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.extra = self._status("VmHWM") - self.start


def memory_supported(device):
    if device == "cuda":
        return True
    try:
        PeakMemory._status("VmHWM")
        return os.access("/proc/self/clear_refs", os.W_OK)
    except OSError:
        return False


def run(inputs, backend, backward, grad_out):
    """One scan (and backward with upstream gradient grad_out): y and, with backward, the gradients of the inputs."""
    if not backward:
        with torch.no_grad():
            return selective_scan(*inputs, backend=backend), None
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = selective_scan(*leaves, backend=backend)
    y.backward(grad_out)
    return y.detach(), [t.grad for t in leaves]


def timed(fn, device, repeats):
    """(median wall s, median process CPU s, extra peak bytes or None) of ``repeats`` calls after a warm-up call,
    whose peak memory is measured."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if memory_supported(device):
        with PeakMemory(device) as peak:
            fn()
        extra = peak.extra
    else:
        fn()
        extra = None
    sync()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus), extra


def max_rel_error(inputs, backend, device):
    """Worst max |a - b| / max |b| over the output and all gradients, against the float64 reference."""
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    y, grads = run([t.to(device) for t in inputs], backend, True, grad_out.to(device))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference is a loop of tiny ops
    try:
        leaves = [t.double().requires_grad_() for t in inputs]
        y_ref = selective_scan_ref(*leaves)
        y_ref.backward(grad_out.double())
    finally:
        torch.set_num_threads(threads)
    errors = {"y": (y, y_ref.detach())}
    errors.update({f"d{name}": (g, t.grad) for name, g, t in zip(NAMES, grads, leaves)})
    return {
        key: float((a.cpu().double() - b).abs().max() / b.abs().max().clamp_min(1e-30))
        for key, (a, b) in errors.items()
    }


def bench_backend(backend, args, device):
    results = {}
    lengths = [(n, True) for n in args.lengths] + [(n, False) for n in args.forward_only_lengths]
    for length, with_backward in lengths:
        if backend == "torch" and length > args.torch_max_length:
            results[str(length)] = {"skipped": f"torch backend above --torch-max-length {args.torch_max_length}"}
            continue
        inputs = [t.to(device) for t in make_inputs(length, args.seed)]
        grad_out = torch.ones_like(inputs[0])  # made once: the upstream gradient is not part of the scan's cost
        entry = {}
        modes = [("forward", False)] + ([("forward_backward", True)] if with_backward else [])
        for mode, backward in modes:
            wall, cpu, extra = timed(lambda b=backward: run(inputs, backend, b, grad_out), device, args.repeats)
            entry[f"{mode}_s"] = round(wall, 4)
            entry[f"{mode}_cpu_s"] = round(cpu, 4)
            if extra is not None:
                entry[f"{mode}_extra_peak_mb"] = round(extra / 2**20, 1)
        if length <= args.ref_max_length:
            errors = max_rel_error([t.cpu() for t in inputs], backend, device)
            entry["max_rel_error"] = max(errors.values())
            entry["rel_error"] = {k: float(f"{v:.3g}") for k, v in errors.items()}
        results[str(length)] = entry
        print(f"{backend} L={length}: {entry}", file=sys.stderr)
    return results


def check_targets(results):
    """The issue's targets for the cpu backend at L = 16384, with pass/fail."""
    entry = results.get("cpu", {}).get(str(TARGETS["length"]))
    report = {"backend": "cpu", "required": dict(TARGETS)}
    if not entry or "forward_s" not in entry:
        report["measured"] = None
        report["all_pass"] = None
        return report
    peak = max(entry.get("forward_extra_peak_mb", 0), entry.get("forward_backward_extra_peak_mb", 0)) * 2**20
    report["measured"] = {
        "forward_s": entry["forward_s"],
        "forward_backward_s": entry.get("forward_backward_s"),
        "extra_peak_bytes": int(peak),
    }
    report["pass"] = {
        "forward_s": entry["forward_s"] <= TARGETS["forward_s"],
        "forward_backward_s": entry.get("forward_backward_s", float("inf")) <= TARGETS["forward_backward_s"],
        "extra_peak_bytes": peak <= TARGETS["extra_peak_bytes"],
    }
    report["all_pass"] = all(report["pass"].values())
    return report


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure_build:
        os.environ["CSM_CACHE_DIR"] = tempfile.mkdtemp(prefix="csm_scan_build_")
    report = {
        "benchmark": "selective scan backends",
        "shape": {"batch": 1, "directions": 4, "channels_per_direction": 256, "d_state": 16},
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_start": load_average(),
        },
        "method": {
            "time": f"wall-clock median of {args.repeats} runs after one warm-up (cuda: synchronised); *_cpu_s: "
            "process CPU time of the same runs",
            "memory": {"cpu": PeakMemory("cpu").method, "cuda": PeakMemory("cuda").method},
            "inputs": "u, B, C ~ N(0, 1), delta ~ N(0, 0.25), A = -(n + 1), D = 1, softplus(delta_bias) "
            "log-uniform in [1e-3, 0.1] (SS2D's init)",
            "error": "max |a - b| / max |b| vs the float64 reference, over y and every gradient",
        },
        "cpu_extension": None,
        "results": {},
        "unavailable": {},
    }
    for backend in args.backends:
        device = "cuda" if backend == "cuda" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            report["unavailable"][backend] = "no CUDA device"
            continue
        try:  # a one-step scan: builds the cpu extension on its first use
            run([t.to(device) for t in make_inputs(1, args.seed, channels=1)], backend, False, None)
        except ScanBackendError as exc:
            report["unavailable"][backend] = str(exc)
            continue
        if backend == "cpu":
            from layers.scan import cpu

            report["cpu_extension"] = {
                "build_s": round(cpu.BUILD_INFO["seconds"], 2),
                "cached": cpu.BUILD_INFO["cached"],
                "fresh_build_measured": args.measure_build,
                "path": cpu.BUILD_INFO["path"],
            }
        report["results"][backend] = bench_backend(backend, args, device)
    report["machine"]["load_average_end"] = load_average()
    report["targets"] = check_targets(report["results"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
