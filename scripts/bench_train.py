"""Training throughput: images per second of one full step (forward, backward, both optimizer steps), as JSON.

    python scripts/bench_train.py                    # csm-small and csm N=128, batch 1, 256x256, CPU
    python scripts/bench_train.py --cuda --amp bf16 --batch-size 8 --steps 20
    python scripts/bench_train.py --models compressai:mbt2018-mean tcm-small --N 64 --M 96 --batch-size 8

Each configuration runs ``utils.training.train_step`` (the step train.py takes, gradient clipping and the aux
optimizer included) on random images: a few warm-up steps, then the median time of the timed steps.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layers.scan import BACKENDS, resolve_backend  # noqa: E402
from models import build_model, list_models  # noqa: E402
from utils.cli import positive_int  # noqa: E402
from utils.evaluation import synchronize  # noqa: E402
from utils.training import AMP_DTYPES, RateDistortionLoss, configure_optimizers, train_step  # noqa: E402

# (preset, overrides, timed steps on the CPU): the paper's model is slow on a CPU, so it gets fewer steps.
CONFIGS = (("csm-small", {}, 5), ("csm", {"N": 128}, 3))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=1, help="default: %(default)s")
    parser.add_argument("--size", type=positive_int, nargs=2, default=(256, 256), metavar=("H", "W"),
                        help="patch size, multiples of 64 (default: 256 256)")
    parser.add_argument("--steps", type=positive_int,
                        help="timed steps per configuration (default: 5 for csm-small, 3 for csm; 20 with --cuda)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES), help="autocast dtype (default: none)")
    parser.add_argument("--scan-backend", default="auto", choices=BACKENDS, help="default: %(default)s")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--models", nargs="+", choices=list_models(), default=[c[0] for c in CONFIGS],
                        metavar="NAME", help="presets or compressai:ARCH names to run (default: "
                        f"{' '.join(c[0] for c in CONFIGS)}, with their widths above)")
    parser.add_argument("--N", type=positive_int, help="N of every model run (default: each model's)")
    parser.add_argument("--M", type=positive_int, help="M of every model run (default: each model's)")
    args = parser.parse_args(argv)
    if any(s % 64 for s in args.size):
        parser.error(f"--size must be multiples of 64; got {args.size}")
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda was given but no CUDA GPU is available")
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


def bench(preset, overrides, steps, args, device):
    torch.manual_seed(0)
    model = build_model(preset, scan_backend=args.scan_backend, **overrides).to(device).train()
    optimizer, aux_optimizer = configure_optimizers(model)
    criterion = RateDistortionLoss(0.0025)
    x = torch.rand(args.batch_size, 3, *args.size, device=device)
    times = []
    for i in range(args.warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, x, criterion, optimizer, aux_optimizer, 1.0, args.amp)
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
        "timed_steps": steps,
        "step_seconds_median": round(median, 4),
        "step_seconds_all": [round(t, 4) for t in times],
        "images_per_second": round(args.batch_size / median, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    results = []
    for preset, overrides, cpu_steps in configurations(args):
        steps = args.steps or (20 if args.cuda else cpu_steps)
        results.append(bench(preset, overrides, steps, args, device))
    report = {
        "device": torch.cuda.get_device_name(device) if args.cuda else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "scan_backend": resolve_backend(device, args.scan_backend),
        "amp": args.amp,
        "warmup_steps": args.warmup,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
