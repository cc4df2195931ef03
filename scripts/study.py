"""The equal-budget rate-distortion study: the same data, crops, batch, steps, schedule and seed for every model,
each evaluated by eval.py on Kodak with real bitstreams.

    python scripts/study.py --models csm csm-acp-static csm-cnn-only tcm mbt2018-mean --lambdas 0.013 \\
        -d ../shared/data/bsds500 --eval-data ../shared/data/kodak
    python scripts/study.py --list                     # the models and the recipe, as train.py arguments

Each (model, lambda) trains into RUNS/<model>_lambda<lambda>/ (resumed where it stopped when run again), is evaluated
at its last step into RESULTS/<model>_lambda<lambda>.json (CompressAI's results schema, eval.py's per-image
records), and its validation curve (train.py's metrics.jsonl: step, seconds of the run, loss, bpp, PSNR) is copied to
RESULTS/curves/. A pair whose result JSON exists is skipped, so an interrupted study loses one run at most.
``--dry-run`` prints the commands.
"""

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The models of the study, at about 7-8 M parameters each, as train.py arguments.
MODELS = {
    "csm": ["-m", "csm-small"],  # the paper's SRB: adaptive ACP, CNN || VSS branches, SSM context blocks
    "csm-acp-static": ["-m", "csm-small", "--acp", "static"],  # the released code's fixed split after the score
    "csm-cnn-only": ["-m", "csm-small", "--no-ssm-branch"],  # both branches CNN
    "tcm": ["-m", "tcm-small"],  # TCM's CNN || Swin blocks, Swin context blocks
    "mbt2018-mean": ["-m", "compressai:mbt2018-mean", "--N", "128", "--M", "192"],  # CompressAI's, 7.0 M parameters
}
STEPS_PER_EPOCH = 25  # 200 BSDS500 training images, batch 8: one epoch
# The recipe: Adam at 5e-4 (a short budget), x0.1 at 80 % and 93 % of the steps; 128x128 crops, batch 8,
# validation (100 centre crops) every 10 epochs; the seed fixes initialisation, crops, order and noise.
# Learning rate measured on csm-small (this recipe, 500 steps): validation loss 9.14 (20.59 dB, 0.340 bpp) at 5e-4
# against 11.04 (19.70 dB, 0.352 bpp) at 2e-4, the bundled model's rate; 2e-4 led only in the first 100 steps.
RECIPE = ["--patch-size", "128", "128", "--batch-size", "8", "--test-batch-size", "8", "-lr", "5e-4",
          "--seed", "0", "--val-every", "10", "--save-every-steps", "250", "--snapshot-every", "0", "--log-every", "50",
          "--no-progress"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.013])
    parser.add_argument("--steps", type=int, default=3000, help="training steps of every run (default: %(default)s)")
    parser.add_argument("-d", "--dataset", default=str(REPO.parent / "shared" / "data" / "bsds500"),
                        help="train.py's -d (default: ../shared/data/bsds500)")
    parser.add_argument("--eval-data", default=str(REPO.parent / "shared" / "data" / "kodak"),
                        help="eval.py's --data (default: ../shared/data/kodak)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "study", help="default: runs/study")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "study", help="default: results/study")
    parser.add_argument("--train-args", default="", help="more train.py arguments (one shell-quoted string)")
    parser.add_argument("--eval-args", default="", help="more eval.py arguments, e.g. \"--threads 1\" beside another "
                        "run (one shell-quoted string)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--list", action="store_true", help="print the models and the recipe and exit")
    args = parser.parse_args(argv)
    if args.steps % STEPS_PER_EPOCH:
        parser.error(f"--steps must be a multiple of {STEPS_PER_EPOCH} (one epoch)")
    return args


def schedule(steps):
    """(epochs, lr milestones in epochs) for ``steps`` training steps: decays at 80 % and 93 % of the run."""
    epochs = steps // STEPS_PER_EPOCH
    return epochs, [round(0.8 * epochs), round(0.93 * epochs)]


def name_of(model, lmbda):
    return f"{model}_lambda{lmbda:g}"


def train_command(args, model, lmbda):
    epochs, milestones = schedule(args.steps)
    folder = args.runs / name_of(model, lmbda)
    command = [sys.executable, "-u", str(REPO / "train.py"), "-d", args.dataset, *MODELS[model], *RECIPE,
               "--lambda", f"{lmbda:g}", "--epochs", str(epochs), "--lr_epoch", *map(str, milestones),
               "--save_path", str(folder), *shlex.split(args.train_args)]
    if (folder / "checkpoint_latest.pth.tar").exists():
        command.append("--resume")
    return command


def eval_command(args, model, lmbda):
    folder = args.runs / name_of(model, lmbda)
    return [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(folder / "checkpoint_latest.pth.tar"),
            "--data", args.eval_data, "-o", str(args.results / f"{name_of(model, lmbda)}.json"),
            *shlex.split(args.eval_args)]


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for model, flags in MODELS.items():
            print(f"{model}: {shlex.join(flags)}")
        epochs, milestones = schedule(args.steps)
        print(f"recipe: {shlex.join(RECIPE)} --epochs {epochs} --lr_epoch {milestones[0]} {milestones[1]}")
        return 0
    for lmbda in args.lambdas:
        for model in args.models:
            name = name_of(model, lmbda)
            result = args.results / f"{name}.json"
            if result.exists():
                print(f"[study] {name}: {result} exists, skipped", flush=True)
                continue
            commands = [train_command(args, model, lmbda), eval_command(args, model, lmbda)]
            for command in commands:
                print(f"[study] {name}: {shlex.join(command)}", flush=True)
                if not args.dry_run:
                    subprocess.run(command, cwd=REPO, check=True)
            if not args.dry_run:
                curves = args.results / "curves"
                curves.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(args.runs / name / "metrics.jsonl", curves / f"{name}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
