"""Training speed: seconds per full step (forward, backward, both optimizer steps) and peak memory, as JSON.

    python scripts/bench_train.py --models csm-small --batch-size 8 --size 128 128      # CPU, this tree's defaults
    python scripts/bench_train.py --cuda --batch-size 8 --steps 20                      # GPU
    python scripts/bench_train.py --models compressai:mbt2018-mean tcm-small --N 64 --M 96 --batch-size 8
    git worktree add ../base dfb1adf                                                    # an older commit, then
    python scripts/bench_train.py --baseline ../base --rounds 3 --models csm-small --batch-size 8 --size 128 128

Each configuration runs ``utils.training.train_step`` (the step train.py takes, gradient clipping and the aux
optimizer included) on random images, with train.py's speed settings (``--amp``, ``--threads``, ``--fused-adam``,
``--channels-last``, ``--tf32`` mean what they mean there): a few warm-up steps, then the median of the timed steps.
Every configuration runs in a process of its own, so that its peak memory is its own (``peak_rss_gib``: the
process's peak resident memory, interpreter and libraries included; ``peak_memory_gib``: CUDA's peak allocation).
``--baseline DIR`` also runs the same configurations with the ``scripts/bench_train.py`` of the checkout in DIR
(its own defaults, e.g. no autocast in older ones), alternating with this tree's runs round by round, and reports
each configuration's median over the rounds for both and the ratio (this tree / baseline).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from layers.scan import BACKENDS, resolve_backend  # noqa: E402
from models import build_model, list_models  # noqa: E402
from utils.cli import positive_int  # noqa: E402
from utils.evaluation import synchronize, write_json  # noqa: E402
from utils.training import (AMP_DTYPES, RateDistortionLoss, available_cores, bf16_native,  # noqa: E402
                            configure_optimizers, keep_freed_memory, step_values, train_step)

# (preset, overrides, timed steps on the CPU): the paper's model is slow on a CPU, so it gets fewer steps.
CONFIGS = (("csm-small", {}, 5), ("csm", {"N": 128}, 3))
# Arguments that an older bench_train.py understands too: passed to the baseline unchanged.
SHARED_FLAGS = ("batch_size", "size", "steps", "warmup", "cuda", "scan_backend", "threads")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=1, help="default: %(default)s")
    parser.add_argument("--size", type=positive_int, nargs=2, default=(256, 256), metavar=("H", "W"),
                        help="patch size, multiples of 64 (default: 256 256)")
    parser.add_argument("--steps", type=positive_int,
                        help="timed steps per configuration (default: 5 for csm-small, 3 for csm; 20 with --cuda)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--amp", default="auto", choices=("auto", *AMP_DTYPES),
                        help="autocast dtype, as train.py's --amp (default: auto)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc keeps freed memory, as train.py (default: on)")
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                        help="torch's fused Adam, as train.py (default: on)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="channels_last model and batch, as train.py (default: off)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 on CUDA, as train.py (default: on)")
    parser.add_argument("--scan-backend", default="auto", choices=BACKENDS, help="default: %(default)s")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: the available cores)")
    parser.add_argument("--models", nargs="+", choices=list_models(), default=[c[0] for c in CONFIGS],
                        metavar="NAME", help="presets or compressai:ARCH names to run (default: "
                        f"{' '.join(c[0] for c in CONFIGS)}, with their widths above)")
    parser.add_argument("--N", type=positive_int, help="N of every model run (default: each model's)")
    parser.add_argument("--M", type=positive_int, help="M of every model run (default: each model's)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="a checkout of other code (e.g. `git worktree add ../base REV`) whose "
                             "scripts/bench_train.py runs the same configurations, taking turns with this tree's")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="runs of every configuration (each side, with --baseline) (default: %(default)s)")
    parser.add_argument("-o", "--output", help="also write the JSON report to this file (atomically)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one child's run
    args = parser.parse_args(argv)
    if any(s % 64 for s in args.size):
        parser.error(f"--size must be multiples of 64; got {args.size}")
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda was given but no CUDA GPU is available")
    if args.channels_last and not args.cuda:
        parser.error("--channels-last needs --cuda (see train.py --help)")
    if args.baseline and not (Path(args.baseline) / "scripts" / "bench_train.py").is_file():
        parser.error(f"--baseline {args.baseline}: no scripts/bench_train.py there")
    return args


def configurations(args):
    """(model, overrides, timed CPU steps) of each --models name: CONFIGS's entry, else no overrides and 5 steps;
    --N and --M on top."""
    known = {name: (overrides, steps) for name, overrides, steps in CONFIGS}
    widths = {k: v for k, v in (("N", args.N), ("M", args.M)) if v is not None}
    runs = []
    for name in args.models:
        overrides, steps = known.get(name, ({}, 5))
        runs.append((name, {**overrides, **widths}, steps))
    return runs


def resolved_amp(args, device):
    return ("bf16" if bf16_native(device) else "none") if args.amp == "auto" else args.amp


def bench(preset, overrides, steps, args, device):
    """Time ``steps`` training steps of one configuration in this process."""
    torch.manual_seed(0)
    amp = resolved_amp(args, device)
    model = build_model(preset, scan_backend=args.scan_backend, **overrides).to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer, aux_optimizer = configure_optimizers(model, fused=args.fused_adam)
    criterion = RateDistortionLoss(0.0025)
    x = torch.rand(args.batch_size, 3, *args.size, device=device).contiguous(memory_format=memory_format)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        result = train_step(model, x, criterion, optimizer, aux_optimizer, 1.0, amp)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "model": preset,
        "overrides": overrides,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "batch_size": args.batch_size,
        "size": list(args.size),
        "amp": amp,
        "fused_adam": args.fused_adam,
        "channels_last": args.channels_last,
        "keep_freed_memory": args.keep_freed_memory,
        "timed_steps": steps,
        "step_seconds_median": round(median, 4),
        "step_seconds_all": [round(t, 4) for t in times],
        "images_per_second": round(args.batch_size / median, 4),
        "last_loss": round(step_values(result)["loss"], 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
    }


def child_argv(args, model, baseline):
    """Command-line arguments of one configuration's run: the shared flags, plus this tree's speed flags."""
    argv = ["--models", model, "--batch-size", str(args.batch_size), "--size", *map(str, args.size),
            "--warmup", str(args.warmup), "--scan-backend", args.scan_backend, "--threads", str(args.threads)]
    if args.steps:
        argv += ["--steps", str(args.steps)]
    if args.cuda:
        argv.append("--cuda")
    known = {name for name, _, _ in CONFIGS}
    widths = [("--N", args.N), ("--M", args.M)]
    if baseline:
        if model not in known or any(value is not None for _, value in widths):
            raise SystemExit(f"--baseline runs the default configurations only ({', '.join(sorted(known))}), "
                             "without --N/--M")
        return argv
    argv += ["--amp", args.amp, "--fused-adam" if args.fused_adam else "--no-fused-adam",
             "--channels-last" if args.channels_last else "--no-channels-last", "--tf32" if args.tf32 else "--no-tf32",
             "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory",
             "--in-process"]
    return argv + [item for flag, value in widths if value is not None for item in (flag, str(value))]


def run_child(root, argv):
    """Run ``root/scripts/bench_train.py argv`` in its own process (working directory ``root``): its one result,
    with the process's peak resident memory (from the kernel's accounting of the child, so that any version of
    the script is measured the same way)."""
    command = [sys.executable, str(Path(root) / "scripts" / "bench_train.py"), *argv]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}):\n{err.read()[-2000:]}")
    report = json.loads(out[out.index("{"):])
    result = report["results"][0]
    result["peak_rss_gib"] = round(usage.ru_maxrss * 1024 / 2**30, 3)  # ru_maxrss: KiB on Linux
    result["scan_backend"] = report.get("scan_backend")
    return result


def summary(runs):
    """Median over rounds of the runs' median step times, and the other fields of the first run."""
    first = dict(runs[0])
    medians = [r["step_seconds_median"] for r in runs]
    first["step_seconds_median"] = round(statistics.median(medians), 4)
    first["step_seconds_per_round"] = medians
    first["images_per_second"] = round(first["batch_size"] / first["step_seconds_median"], 4)
    rss = [r.get("peak_rss_gib") for r in runs if r.get("peak_rss_gib") is not None]
    first["peak_rss_gib"] = max(rss) if rss else None
    first.pop("step_seconds_all", None)
    return first


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    args.threads = args.threads or available_cores()
    torch.set_num_threads(args.threads)
    if args.cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.in_process:
        if args.keep_freed_memory:
            keep_freed_memory()
        [(preset, overrides, cpu_steps)] = configurations(args)
        result = bench(preset, overrides, args.steps or (20 if args.cuda else cpu_steps), args, device)
        print(json.dumps({"results": [result], "scan_backend": resolve_backend(device, args.scan_backend)}))
        return
    results = []
    for preset, _, _ in configurations(args):
        ours, theirs = [], []
        for round_index in range(args.rounds):
            sides = [("this", REPO, ours)] + ([("baseline", Path(args.baseline).resolve(), theirs)] if args.baseline
                                              else [])
            if round_index % 2:  # take turns in both orders
                sides.reverse()
            for side, root, runs in sides:
                runs.append(run_child(root, child_argv(args, preset, side == "baseline")))
        entry = summary(ours)
        if args.baseline:
            entry["baseline"] = summary(theirs)
            entry["time_ratio"] = round(entry["step_seconds_median"] / entry["baseline"]["step_seconds_median"], 3)
        results.append(entry)
    report = {
        "device": torch.cuda.get_device_name(device) if args.cuda else "cpu",
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "scan_backend": resolve_backend(device, args.scan_backend),
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "baseline": str(Path(args.baseline).resolve()) if args.baseline else None,
        "baseline_commit": git_commit(args.baseline) if args.baseline else None,
        "commit": git_commit(REPO),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        write_json(args.output, report)


def git_commit(root):
    """The checkout's commit (with '+changes' when its tracked files differ from it), or None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD"], capture_output=True).returncode
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
