"""Training speed on a GPU machine, old and new code side by side, in one run (``scripts/gpu_train_speed.sh``).

Stages, each recorded in one JSON that is rewritten after every stage (so a time limit leaves what finished):

1. ``setup``: mamba-ssm's kernel for this GPU and compressai from third_party/ (``gpu_check.py --stages
   deps,build``, about 2.5 minutes), put on PYTHONPATH for the benchmark processes.
2. ``csm``: ``scripts/bench_train.py --cuda`` on ``csm`` (N=128), batch 8, 256x256: this tree's defaults (bf16
   autocast, fused Adam, TF32) against the baseline checkout in BASELINE (float32, its own defaults), taking turns.
3. ``variants``: this tree with ``--amp none`` (float32 + TF32 + fused Adam) and with ``--channels-last``; ``tcm``
   with this tree's defaults (the reference model; the old figure is in measurements/gpu_check_h200.json).
4. ``amp``: ``scripts/amp_check.py --cuda``: does bf16 train the same model as float32 (csm-small, 300 steps)?
   Needs BSDS500 in DATA (carried: the GPU machine has no ../shared).

    bash scripts/gpu_train_speed.sh --prepare dfb1adf     # here: the baseline checkout in .baseline/, data in
                                                          # .gpu_data/ (both git-ignored, carried)
    bash scripts/gpu_train_speed.sh                       # on the GPU machine: $OUT/gpu_train_speed.json
    python scripts/gpu_train_speed.py --smoke             # here, no GPU: every stage on the CPU at tiny sizes
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / ".baseline"
DATA = REPO / ".gpu_data" / "bsds500"
STAGES = ("setup", "csm", "variants", "amp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="JSON (default: $OUT/gpu_train_speed.json, else results/)")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="older checkout (default: .baseline)")
    parser.add_argument("--data", type=Path, default=DATA, help="BSDS500 (train/, val/) for the amp stage")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no new stage after this many seconds (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: every stage but setup on the CPU, tiny sizes, one step")
    args = parser.parse_args(argv)
    args.stages = chosen_stages(parser, args.stages, STAGES, args.smoke)
    if args.output is None:
        out = os.environ.get("OUT")
        args.output = Path(out) / "gpu_train_speed.json" if out else REPO / "results" / "gpu_train_speed.json"
    return args


def chosen_stages(parser, text, stages, smoke):
    """The stages named in ``text`` (comma-separated, each one of ``stages``), without setup when ``smoke``."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(stages))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {','.join(stages)}")
    return [s for s in chosen if not (smoke and s == "setup")]


def bench_flags(smoke):
    """bench_train.py's configuration: csm at N=128, batch 8, 256x256 on the GPU; csm-small, one 64x64 image, one
    step on the CPU."""
    if smoke:
        return ["--models", "csm-small", "--batch-size", "1", "--size", "64", "64", "--steps", "1", "--warmup", "1",
                "--threads", "1"]
    return ["--cuda", "--models", "csm", "--batch-size", "8", "--size", "256", "256", "--steps", "10", "--warmup", "3"]


def run_json(command, env, log):
    """Run a script that writes its JSON report with -o; return the report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        print(f"[gpu_train_speed] $ {' '.join(command[1:])}", flush=True)
        # -o right after the script: amp_check.py passes whatever follows its "--" to train.py
        proc = subprocess.run([*command[:2], "-o", str(out), *command[2:]], cwd=REPO, env=env, capture_output=True,
                              text=True)
        log.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        if not out.exists():
            raise RuntimeError(f"{' '.join(command[1:3])} exited with {proc.returncode}: {proc.stderr[-1500:]}")
        return json.loads(out.read_text())


def setup(record, env):
    """Kernel and compressai via gpu_check.py's deps and build stages; their paths go on PYTHONPATH."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "build.json"
        subprocess.run([sys.executable, "scripts/gpu_check.py", "--stages", "deps,build", "--output", str(out)],
                       cwd=REPO, env=env, check=False)
        report = json.loads(out.read_text())
    record["gpu_check"] = {name: {k: v for k, v in stage.items() if k != "traceback"}
                           for name, stage in report["stages"].items()}
    record["env"] = report.get("env")
    if not all(stage["ok"] for stage in report["stages"].values()):
        raise RuntimeError("the kernel build or the compressai install failed (see gpu_check)")
    paths = [str(Path(report["stages"]["build"]["module"]).parent),
             str(Path(report["stages"]["deps"]["compressai_path"]).parent)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    record["pythonpath"] = env["PYTHONPATH"]


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    report = {"tool": "scripts/gpu_train_speed.py", "smoke": args.smoke,
              "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "stages": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.output.with_suffix(".log")
    bench = [sys.executable, "scripts/bench_train.py", *bench_flags(args.smoke)]
    small = ["--N", "8", "--M", "40", "--Z", "16", "--num-slices", "2", "--override", "context_dim=16",
             "cc_hidden=(16, 16)", "--patch-size", "64", "64", "--batch-size", "2", "--test-batch-size", "2"]
    stage_commands = {
        "csm": [[*bench, "--baseline", str(args.baseline), "--rounds", "1" if args.smoke else "2"]],
        # channels_last on CUDA only (train.py refuses it on the CPU)
        "variants": [[*bench, "--amp", "none"], *([] if args.smoke else [[*bench, "--channels-last"]]),
                     [*bench[:bench.index("--models") + 1], "tcm-small" if args.smoke else "tcm",
                      *bench[bench.index("--models") + 2:]]],
        "amp": [[sys.executable, "scripts/amp_check.py", "-d", str(args.data),
                 *(["--steps", "3", "--", *small] if args.smoke else ["--cuda", "--steps", "300"])]],
    }
    with open(log_path, "w") as log:
        for name in args.stages:
            record = {"ok": False}
            report["stages"][name] = record
            began = time.perf_counter()
            if began - start > args.budget_s:
                record["error"] = f"not started: past --budget-s {args.budget_s}"
            else:
                try:
                    if name == "setup":
                        setup(record, env)
                    else:
                        record["reports"] = [run_json(command, env, log) for command in stage_commands[name]]
                    record["ok"] = True
                except Exception as exc:  # noqa: BLE001 -- recorded, and the next stage still runs
                    record["error"] = f"{type(exc).__name__}: {exc}"
            record["seconds"] = round(time.perf_counter() - began, 1)
            print(f"[gpu_train_speed] {name}: {'ok' if record['ok'] else record['error']} ({record['seconds']} s)",
                  flush=True)
            report["seconds"] = round(time.perf_counter() - start, 1)
            tmp = args.output.with_name(args.output.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(args.output)
    print(summary(report))
    return 0 if all(stage["ok"] for stage in report["stages"].values()) else 1


def summary(report):
    """One line per timed configuration: seconds per step, peak memory, ratio to the baseline."""
    lines = []
    for name in ("csm", "variants"):
        for bench in report["stages"].get(name, {}).get("reports", []):
            for r in bench["results"]:
                line = (f"{r['model']} amp={r['amp']} channels_last={r['channels_last']}: {r['step_seconds_median']} "
                        f"s/step, peak {r['peak_memory_gib']} GiB (CUDA) / {r['peak_rss_gib']} GiB RSS")
                if "baseline" in r:
                    line += (f"; baseline {r['baseline']['step_seconds_median']} s, {r['baseline']['peak_memory_gib']}"
                             f" GiB; ratio {r['time_ratio']}")
                lines.append(line)
    for amp in report["stages"].get("amp", {}).get("reports", []):
        lines.append(f"amp check ({amp['model']}, {amp['steps']} steps): passed={amp['passed']} "
                     f"{json.dumps(amp['comparison']['bf16'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
