"""Train a model on a lent GPU machine for a stated time and bring back what it made, in one run of at most about
10 minutes (``scripts/gpu_train.sh``; ``scripts/device_run.md`` says how to launch it).

Stages, each recorded in one JSON rewritten after every stage (a time limit leaves what finished):

1. ``setup``: mamba-ssm's kernel for this GPU and compressai from third_party/ (``gpu_check.py --stages
   deps,build``, about 2.5 minutes), put on PYTHONPATH for the processes below.
2. ``train``: ``train.py --cuda`` with ``--time-limit`` (the seconds asked for, less whatever the deadline no longer
   allows) and the learning rate decayed by 10 at 80 % and 93 % of that time (``--lr-time-milestones``). With
   ``--init CKPT`` (e.g. the float16 checkpoint an earlier run brought back) the weights start from it and Adam
   starts afresh: a warm start. Without it, from scratch.
3. ``export``: the best validation checkpoint with float16 weights and built entropy tables
   (``scripts/export_checkpoint.py --half``), a few MiB: small enough to come back, to be carried again as
   ``--init``, or to be bundled.
4. ``eval``: ``eval.py --cuda`` on Kodak with real bitstreams (the files decode on any machine, as every coding
   does).

What comes back in OUT (default: $OUT, else results/gpu_train/), at most 7 files: ``gpu_train.json`` (stages,
commands, seconds, steps, the run's validation curve and the Kodak summary), ``NAME.pth.tar``, ``NAME_kodak.json``,
``NAME_metrics.jsonl`` (validation curve), ``NAME_train.log``, ``NAME_eval.log``, and the shell's console log.

    bash scripts/gpu_train.sh --prepare          # here: BSDS500 and Kodak in .gpu_data/, third_party/ (ignored)
    bash scripts/gpu_train.sh --name csm-small_q2 --lambda 0.013 --seconds 330 [--init checkpoints/X.pth.tar]
    python scripts/gpu_train.py --smoke          # here, no GPU: every stage but setup on the CPU, tiny and short
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.gpu_train_speed import chosen_stages, setup  # noqa: E402

DATA = REPO / ".gpu_data"  # carried to the GPU machine (it has no ../shared); here, ../shared/data stands in
SHARED = REPO.parent / "shared" / "data"
STAGES = ("setup", "train", "export", "eval")
EVAL_RESERVE_S = 150  # what the export and the Kodak evaluation need after training (eval about 1 minute)
# The training recipe on the GPU: the study's (scripts/study.py) at 256x256 crops.
RECIPE = ["--patch-size", "256", "256", "--batch-size", "8", "--test-batch-size", "8", "--val-every", "5",
          "--save-every-steps", "500", "--snapshot-every", "0", "--log-every", "100", "--no-progress",
          "--epochs", "100000", "--lr_epoch", "100000", "--lr-time-milestones", "0.8", "0.93"]
# --smoke: a tiny csm on 64x64 crops, one thread, a few seconds.
SMOKE = ["--N", "8", "--M", "40", "--Z", "16", "--num-slices", "2", "--override", "context_dim=16", "cc_hidden=(16, 16)",
         "--patch-size", "64", "64", "--batch-size", "2", "--test-batch-size", "2", "--epoch-steps", "2",
         "--val-every", "1", "--snapshot-every", "0", "--no-progress", "--threads", "1", "--epochs", "100000",
         "--lr-time-milestones", "0.8"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=None, help="name of the outputs (default: <model>_lambda<lambda>)")
    parser.add_argument("-m", "--model", default="csm-small", help="train.py's -m (default: %(default)s)")
    parser.add_argument("--lambda", dest="lmbda", type=float, default=0.013, help="default: %(default)s")
    parser.add_argument("-lr", "--learning-rate", type=float, default=5e-4, help="default: %(default)s")
    parser.add_argument("--seconds", type=float,
                        help="training time asked for (default: 330, with --smoke 10); less if the deadline comes "
                             "first")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="the whole run ends by then: training is cut to leave the export and the evaluation "
                             f"{EVAL_RESERVE_S} s (default: %(default)s)")
    parser.add_argument("--init", type=Path, help="start from these weights (train.py --checkpoint), Adam afresh")
    parser.add_argument("--data", type=Path, help="training data, train/ and val/ (default: .gpu_data/bsds500, "
                        "else ../shared/data/bsds500)")
    parser.add_argument("--eval-data", type=Path, help="evaluation images (default: .gpu_data/kodak, else "
                        "../shared/data/kodak)")
    parser.add_argument("--train-args", default="", help="more train.py arguments (one shell-quoted string)")
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT, else results/gpu_train)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: a tiny model on the CPU for a few seconds, one Kodak image; no setup stage")
    args = parser.parse_args(argv)
    args.stages = chosen_stages(parser, args.stages, STAGES, args.smoke)
    if args.seconds is None:
        args.seconds = 10.0 if args.smoke else 330.0
    if args.init is not None and not args.init.is_file():
        parser.error(f"--init {args.init}: no such file")
    default = lambda name: DATA / name if (DATA / name).is_dir() else SHARED / name  # noqa: E731
    args.data = args.data or default("bsds500")
    args.eval_data = args.eval_data or default("kodak")
    for flag, folder in (("--data", args.data), ("--eval-data", args.eval_data)):
        if not folder.is_dir():
            parser.error(f"{flag} {folder}: no such folder (bash scripts/gpu_train.sh --prepare fills .gpu_data/)")
    if args.name is None:
        args.name = f"{args.model.replace(':', '-')}_lambda{args.lmbda:g}"
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "results" / "gpu_train"
    return args


def train_command(args, run_dir, seconds):
    command = [sys.executable, "-u", "train.py", "-d", str(args.data), "-m", args.model, "--lambda", f"{args.lmbda:g}",
               "-lr", f"{args.learning_rate:g}", *(SMOKE if args.smoke else [*RECIPE, "--cuda"]),
               "--time-limit", f"{seconds:.0f}", "--save_path", str(run_dir), *shlex.split(args.train_args)]
    if args.init is not None:
        command += ["--checkpoint", str(args.init)]
    return command


def run_logged(command, env, log_path, record):
    """Run ``command`` with its output in ``log_path``; record the command and its exit status."""
    record["command"] = " ".join(shlex.quote(str(c)) for c in command)
    print(f"[gpu_train] $ {record['command']}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    record["returncode"] = proc.returncode
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"exited with {proc.returncode}: {tail}")


def read_curve(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = REPO / "runs" / "gpu_train" / args.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time; what carries over is --init
    exported = args.out / f"{args.name}.pth.tar"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    report = {"tool": "scripts/gpu_train.py", "smoke": args.smoke, "name": args.name,
              "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "init": str(args.init) if args.init else None, "stages": {}}
    output = args.out / "gpu_train.json"

    def train(record):
        seconds = min(args.seconds, args.deadline_s - (time.perf_counter() - start) - EVAL_RESERVE_S)
        if seconds < (1 if args.smoke else 30):
            raise RuntimeError(f"only {seconds:.0f} s left for training before --deadline-s {args.deadline_s}")
        record["time_limit_s"] = round(seconds)
        try:
            run_logged(train_command(args, run_dir, seconds), env, args.out / f"{args.name}_train.log", record)
        finally:
            curve = read_curve(run_dir / "metrics.jsonl")
            if curve:
                shutil.copy(run_dir / "metrics.jsonl", args.out / f"{args.name}_metrics.jsonl")
                record["curve"] = curve
                record["steps"], record["train_seconds"] = curve[-1]["step"], curve[-1]["seconds"]

    def export(record):
        source = run_dir / "checkpoint_best.pth.tar"
        log_path = args.out / f"{args.name}_export.log"
        try:
            run_logged([sys.executable, "scripts/export_checkpoint.py", str(source), str(exported), "--half"], env,
                       log_path, record)
        finally:
            record["output"] = log_path.read_text(errors="replace").strip()[-1000:]  # a line: kept in the report
            log_path.unlink()
        record["mib"] = round(exported.stat().st_size / 2**20, 2)

    def evaluate(record):
        results = args.out / f"{args.name}_kodak.json"
        command = [sys.executable, "eval.py", "--checkpoint", str(exported), "--data", str(args.eval_data),
                   "--name", args.name, "-o", str(results), "--per-image"]
        command += ["--limit", "1", "--threads", "1"] if args.smoke else ["--cuda"]
        run_logged(command, env, args.out / f"{args.name}_eval.log", record)
        record["results"] = {k: v for k, v in json.loads(results.read_text())["results"].items()
                             if not isinstance(v, list) or len(v) <= 1}

    stages = {"setup": lambda record: setup(record, env), "train": train, "export": export, "eval": evaluate}
    for name in args.stages:
        record = {"ok": False}
        report["stages"][name] = record
        began = time.perf_counter()
        failed = [stage for stage, done in report["stages"].items() if stage != name and not done["ok"]]
        try:
            if failed:  # each stage needs the ones before it
                raise RuntimeError(f"not started: {failed[0]} failed")
            stages[name](record)
            record["ok"] = True
        except Exception as exc:  # noqa: BLE001 -- recorded in the report
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["seconds"] = round(time.perf_counter() - began, 1)
        print(f"[gpu_train] {name}: {'ok' if record['ok'] else record['error']} ({record['seconds']} s)", flush=True)
        report["seconds"] = round(time.perf_counter() - start, 1)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(output)
    print(summary(report))
    return 0 if all(stage["ok"] for stage in report["stages"].values()) else 1


def summary(report):
    """The lines to read first: steps and time trained, the last validation, the Kodak point."""
    lines = []
    train = report["stages"].get("train", {})
    if train.get("curve"):
        last = train["curve"][-1]
        lines.append(f"{report['name']}: {last['step']} steps in {last['seconds']} s; validation loss "
                     f"{last['loss']:.4g}, {last['psnr']:.2f} dB, {last['bpp_loss']:.4f} bpp")
    results = report["stages"].get("eval", {}).get("results")
    if results:
        lines.append(f"{report['name']} on the evaluation images: {json.dumps(results)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
