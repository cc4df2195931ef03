"""Train one model per lambda, then evaluate every best checkpoint into one rate-distortion JSON.

    python scripts/sweep.py --lambdas 0.0025 0.0035 0.0067 0.013 0.025 0.05 --save_path runs/csm \\
        --eval-data /data/kodak --gpus 0 1 2 3 -- -d /data/imagenet --cuda --N 128 --epochs 40 --lr_epoch 35 38

Arguments after ``--`` (or any this script does not know) go to every ``train.py`` run unchanged; each run writes to
SAVE_PATH/lambda_<value>/ (``--lambda`` and ``--save_path`` are set per run). Without ``--gpus`` the runs go one
after the other with their output on the console; with ``--gpus`` one run per GPU goes in parallel
(``CUDA_VISIBLE_DEVICES``, ``--cuda`` added), each logging to its folder's train.log, the next lambda starting as
soon as a GPU is free. Then ``eval.py --checkpoint <each checkpoint_best.pth.tar> --data EVAL_DATA -o
SAVE_PATH/rd.json`` runs (skipped with a message when eval.py or --eval-data is missing). ``--dry-run`` prints the
commands without running them.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEST = "checkpoint_best.pth.tar"


def parse_args(argv=None):
    # No abbreviations: "--lambda" meant for train.py must not be taken for "--lambdas".
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--lambdas", type=float, nargs="+", required=True, help="one training run per value")
    parser.add_argument("--save_path", "--save-path", dest="save_path", type=Path, required=True,
                        help="sweep folder: runs in SAVE_PATH/lambda_<value>/, results in SAVE_PATH/rd.json")
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU ids: one run per GPU at a time, in parallel")
    parser.add_argument("--eval-data", type=Path, help="images to evaluate the best checkpoints on (e.g. Kodak)")
    parser.add_argument("--eval-args", default="", help="extra eval.py arguments, one shell-quoted string")
    parser.add_argument("--skip-existing", action="store_true",
                        help="do not retrain a lambda whose folder already holds " + BEST)
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    for flag in ("--lambda", "--save_path", "--save-path"):
        if flag in (a.split("=")[0] for a in train_args):
            parser.error(f"{flag} is set per run by the sweep; do not pass it to train.py")
    return args, train_args


def run_folder(save_path, lmbda):
    return save_path / f"lambda_{lmbda:g}"


def train_command(lmbda, folder, train_args, gpu=None):
    """(command, environment overrides) of one training run."""
    command = [sys.executable, "-u", str(REPO / "train.py"), *train_args, "--lambda", f"{lmbda:g}",
               "--save_path", str(folder)]
    env = {}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        if "--cuda" not in command:
            command.append("--cuda")
    return command, env


def eval_command(checkpoints, args, cuda):
    command = [sys.executable, str(REPO / "eval.py"), "--checkpoint", *map(str, checkpoints), "--data",
               str(args.eval_data), "-o", str(args.save_path / "rd.json"), *shlex.split(args.eval_args)]
    if cuda and "--cuda" not in command:
        command.append("--cuda")
    return command


def show(command, env=None):
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(command)


def run_sequential(folders, train_args):
    """Train each (lambda, folder) one after the other, output on the console; returns {lambda: exit code}."""
    codes = {}
    for lmbda, folder in folders:
        command, env = train_command(lmbda, folder, train_args)
        print(f"[sweep] lambda {lmbda:g}: {show(command, env)}", flush=True)
        codes[lmbda] = subprocess.run(command, env={**os.environ, **env}, cwd=REPO).returncode
    return codes


def run_parallel(folders, train_args, gpus):
    """Train each (lambda, folder), one run per GPU at a time, output to the folder's train.log."""
    pending, running, codes = list(folders), {}, {}
    while pending or running:
        for gpu in gpus:
            if gpu not in running and pending:
                lmbda, folder = pending.pop(0)
                command, env = train_command(lmbda, folder, train_args, gpu)
                folder.mkdir(parents=True, exist_ok=True)
                log_file = open(folder / "train.log", "a")
                print(f"[sweep] lambda {lmbda:g} on GPU {gpu} (log: {folder / 'train.log'}): {show(command, env)}",
                      flush=True)
                process = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO, stdout=log_file,
                                           stderr=subprocess.STDOUT)
                running[gpu] = (lmbda, process, log_file)
        for gpu, (lmbda, process, log_file) in list(running.items()):
            if process.poll() is not None:
                log_file.close()
                codes[lmbda] = process.returncode
                print(f"[sweep] lambda {lmbda:g} finished with exit code {process.returncode}", flush=True)
                del running[gpu]
        time.sleep(1)
    return codes


def main(argv=None):
    args, train_args = parse_args(argv)
    cuda = bool(args.gpus) or "--cuda" in train_args
    folders = []
    for lmbda in args.lambdas:
        folder = run_folder(args.save_path, lmbda)
        if args.skip_existing and (folder / BEST).is_file():
            print(f"[sweep] lambda {lmbda:g}: {folder / BEST} exists, not retrained")
        else:
            folders.append((lmbda, folder))
    checkpoints = [run_folder(args.save_path, lmbda) / BEST for lmbda in args.lambdas]
    evaluation = eval_command(checkpoints, args, cuda) if args.eval_data else None

    if args.dry_run:
        for i, (lmbda, folder) in enumerate(folders):
            gpu = args.gpus[i % len(args.gpus)] if args.gpus else None
            print(show(*train_command(lmbda, folder, train_args, gpu)))
        print(show(evaluation) if evaluation else "# no --eval-data: evaluation skipped")
        return 0

    codes = run_parallel(folders, train_args, args.gpus) if args.gpus else run_sequential(folders, train_args)
    failed = sorted(lmbda for lmbda, code in codes.items() if code != 0)
    if failed:
        print(f"[sweep] training failed for lambda {' '.join(f'{v:g}' for v in failed)}", file=sys.stderr)
    if evaluation is None:
        print("[sweep] no --eval-data given: evaluation skipped")
    elif not (REPO / "eval.py").is_file():
        print(f"[sweep] {REPO / 'eval.py'} not found: evaluation skipped; run it later as:\n{show(evaluation)}")
    else:
        present = [c for c in checkpoints if c.is_file()]
        missing = [c for c in checkpoints if not c.is_file()]
        if missing:
            print(f"[sweep] no best checkpoint in {', '.join(str(c.parent) for c in missing)}: not evaluated")
        if present:
            evaluation = eval_command(present, args, cuda)
            print(f"[sweep] evaluating: {show(evaluation)}", flush=True)
            code = subprocess.run(evaluation, cwd=REPO).returncode
            if code != 0:
                print(f"[sweep] eval.py failed with exit code {code}", file=sys.stderr)
                return code
            print(f"[sweep] rate-distortion results: {args.save_path / 'rd.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
