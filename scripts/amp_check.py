"""Does bf16 autocast train the same model as float32? Short train.py runs side by side, validation metrics as JSON.

    python scripts/amp_check.py -d ../shared/data/bsds500 -o measurements/amp_check_cpu.json
    python scripts/amp_check.py -d DATA --cuda --steps 500 -- --patch-size 256 256    # extra train.py arguments

Three runs of the same model, data, crops and initialisation: float32 with --seed S, float32 with --seed S+1 (the
spread that a change of seed alone gives) and bf16 with --seed S. Each trains --steps steps and validates at the
end (train.py's metrics.jsonl). bf16 passes when its validation loss, bpp and PSNR are within the stated margins of
the float32 run with the same seed: a relative margin for the loss and bpp, an absolute one in dB for PSNR.
Exit status 0 when it passes, 1 when not.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.cli import positive_int  # noqa: E402
from utils.evaluation import write_json  # noqa: E402

MARGINS = {"loss": 0.03, "bpp_loss": 0.10, "psnr": 0.2}  # relative, relative, dB
RUNS = (("fp32", "none", 0), ("fp32_next_seed", "none", 1), ("bf16", "bf16", 0))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="train.py's -d (train/ and val/ folders)")
    parser.add_argument("-m", "--model", default="csm-small", help="default: %(default)s")
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps of each run (default: 200)")
    parser.add_argument("--lambda", dest="lmbda", default="0.013", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--parallel", action="store_true",
                        help="run the three trainings at once, one thread each (on the CPU)")
    parser.add_argument("--work-dir", help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("-o", "--output", help="write the JSON report here too (atomically)")
    parser.add_argument("train_args", nargs="*", help="more train.py arguments, after --")
    return parser.parse_args(argv)


def train_command(args, amp, seed, save_path):
    """train.py for ``args.steps`` steps as one epoch (or more: an epoch cannot exceed a full pass), validating at
    the end only."""
    return [sys.executable, str(REPO / "train.py"), "-d", args.dataset, "-m", args.model, "--lambda", args.lmbda,
            "--amp", amp, "--seed", str(seed), "--max-steps", str(args.steps), "--epochs", "1000000",
            "--lr_epoch", "1000000", "--val-every", "1000000", "--patch-size", "128", "128", "--batch-size", "8",
            "-lr", "2e-4", "--save_path", str(save_path), "--snapshot-every", "0", "--no-progress",
            "--log-every", "50", *(["--cuda"] if args.cuda else []), *args.train_args]


def run_all(args, root):
    """Start the runs (at once with --parallel) and return {name: final validation metrics}."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = []
    for name, amp, offset in RUNS:
        command = train_command(args, amp, args.seed + offset, root / name)
        if args.parallel:
            command += ["--threads", "1"]
        log = open(root / f"{name}.log", "w")
        procs.append((name, subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        if not args.parallel:
            procs[-1][1].wait()
    results = {}
    for name, proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = (root / f"{name}.log").read_text().splitlines()[-15:]
            raise SystemExit(f"amp_check: run {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        results[name] = json.loads(lines[-1])
    return results


def compare(results):
    """Differences of bf16 and of the next seed from float32 (same seed), and the verdict against MARGINS."""
    reference = results["fp32"]
    report = {}
    for name in ("bf16", "fp32_next_seed"):
        diffs = {}
        for key, margin in MARGINS.items():
            delta = results[name][key] - reference[key]
            relative = key != "psnr"
            value = delta / abs(reference[key]) if relative else delta
            diffs[key] = {"difference": round(value, 5), "unit": "relative" if relative else "dB",
                          "margin": margin, "within": abs(value) <= margin}
        report[name] = diffs
    return report


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = run_all(args, root)
    comparison = compare(results)
    passed = all(d["within"] for d in comparison["bf16"].values())
    report = {
        "model": args.model,
        "steps": args.steps,
        "lambda": float(args.lmbda),
        "device": "cuda" if args.cuda else "cpu",
        "command": " ".join(train_command(args, "AMP", "SEED", "SAVE_PATH")[1:]),
        "margins": MARGINS,
        "validation": {name: {k: results[name][k] for k in ("loss", "bpp_loss", "mse_loss", "psnr", "seconds")}
                       for name in results},
        "comparison": comparison,
        "passed": passed,
    }
    print(json.dumps(report, indent=2))
    if args.output:
        write_json(args.output, report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
