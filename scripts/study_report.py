"""The equal-budget study's report, from what ``scripts/study.py`` left in results/study/: a Markdown table, the
learning curves and an RD plot.

    python scripts/study_report.py                  # -> results/study/report.md, curves.png, rd_kodak.png
    python scripts/study_report.py --no-macs        # skip counting MACs (a few seconds a model)

Per model and lambda, the table gives the parameters and MACs per pixel (``scripts/model_report.py``'s counters, at
768x512), the steps and training hours of the run (its ``metrics.jsonl``, which ``study.py`` copies to curves/), the
Kodak bpp, PSNR and MS-SSIM of ``eval.py`` with real bitstreams, eval.py's mean encode and decode seconds per image,
and the PSNR difference to JPEG and WebP at the same bpp (their published Kodak curves, and Pillow's JPEG, WebP and
AVIF as ``scripts/bench_classical.py`` measured them here where RESULTS/classical/ exists; PCHIP over log bpp). With
two or more lambdas of a model, BD-rates against tcm and those curves (``utils.rd``) follow in a second table. The curves
figure plots validation PSNR and bpp against steps and against hours of training, so that the ranking at equal
steps and at equal time can both be read.
"""

import argparse
import json
import re
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.image import atomic_write  # noqa: E402
from utils.rd import bd_rate, gain_at_equal_rate, load_rd, save_figure  # noqa: E402

PUBLISHED = REPO.parent / "shared" / "data" / "published_rd" / "kodak"
REFERENCES = {"jpeg": "JPEG (published)", "webp": "WebP (published)"}  # published_rd/kodak/<name>.json
CLASSICAL = {"jpeg": "JPEG (Pillow)", "webp": "WebP (Pillow)", "avif": "AVIF (Pillow)"}  # bench_classical.py's
NAME = re.compile(r"^(?P<model>.+)_lambda(?P<lmbda>[0-9.e-]+)$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "results" / "study",
                        help="study.py's results folder (default: results/study)")
    parser.add_argument("--published", type=Path, default=PUBLISHED,
                        help="folder of jpeg.json and webp.json (default: ../shared/data/published_rd/kodak)")
    parser.add_argument("--classical", type=Path, help="scripts/bench_classical.py's output on Kodak, "
                        "<codec>-pillow.json (default: RESULTS/classical, where it exists)")
    parser.add_argument("--out", type=Path, help="output folder (default: --results)")
    parser.add_argument("--no-macs", action="store_true", help="parameters only: no MAC count")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results}: no such folder (scripts/study.py writes it)")
    args.out = args.out or args.results
    args.classical = args.classical or args.results / "classical"
    return args


def read_runs(folder):
    """Every finished run of the study: {(model, lambda): record} from <name>.json and curves/<name>.jsonl."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.stem)
        if not match:
            continue
        results = json.loads(path.read_text())["results"]
        curve_path = folder / "curves" / f"{path.stem}.jsonl"
        curve = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()] \
            if curve_path.exists() else []
        first = {key: values[0] for key, values in results.items() if isinstance(values, list) and values}
        runs[(match["model"], float(match["lmbda"]))] = {
            "model": match["model"], "lambda": float(match["lmbda"]), "name": path.stem,
            "bpp": first["bpp"], "psnr": first["psnr-rgb"], "ms_ssim": first.get("ms-ssim-rgb"),
            "encode_s": first.get("encoding_time"), "decode_s": first.get("decoding_time"),
            "images": first.get("num_images"), "curve": curve,
            "steps": curve[-1]["step"] if curve else None,
            "hours": curve[-1]["seconds"] / 3600 if curve else None,
        }
    return runs


def model_size(model, macs):
    """(parameters, kMACs per pixel or None) of a study model, built as study.py trains it."""
    import torch

    import train
    from models import build_model
    from scripts.model_report import count_macs
    from scripts.study import MODELS

    _, args = train.parse_args(["-d", ".", *MODELS[model]])
    torch.manual_seed(0)
    net = build_model(args.model, **train.model_overrides(args)).eval()
    params = sum(t.numel() for t in net.parameters())
    return params, (count_macs(net, 512, 768)["kmacs_per_pixel_total"] if macs else None)


def signed(value, digits=2, unit=""):
    return "n/a" if value is None else f"{value:+.{digits}f}{unit}"


def plain(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(runs, sizes, references):
    lines = ["| model | lambda | params (M) | kMACs/px | steps | train h | Kodak bpp | PSNR (dB) | MS-SSIM | "
             "enc / dec (s) | " + " | ".join(f"dB vs {name}" for name in references) + " |",
             "|" + "---|" * (10 + len(references))]
    for key in sorted(runs, key=lambda k: (k[1], k[0])):
        run = runs[key]
        params, kmacs = sizes[run["model"]]
        gains = [signed(gain_at_equal_rate(ref, run["bpp"], run["psnr"])) for ref in references.values()]
        times = "n/a" if run["encode_s"] is None else f"{run['encode_s']:.2f} / {run['decode_s']:.2f}"
        lines.append(f"| {run['model']} | {run['lambda']:g} | {params / 1e6:.2f} | {plain(kmacs, 1)} | "
                     f"{run['steps'] or 'n/a'} | {plain(run['hours'], 2)} | {run['bpp']:.4f} | {run['psnr']:.2f} | "
                     f"{plain(run['ms_ssim'], 4)} | {times} | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def bd_table(runs, references):
    """BD-rates of every model with two or more lambdas against tcm (when it has them too) and the references."""
    curves = {}
    for (model, _), run in sorted(runs.items()):
        curves.setdefault(model, []).append(run)
    curves = {m: ([r["bpp"] for r in rs], [r["psnr"] for r in rs]) for m, rs in curves.items() if len(rs) >= 2}
    if not curves:
        return "BD-rates need two or more lambdas of a model: none yet (Phase A has one)."
    anchors = {**({"tcm": curves["tcm"]} if "tcm" in curves else {}),
               **{name: (ref["bpp"], ref["psnr"]) for name, ref in references.items()}}
    lines = ["| model | " + " | ".join(f"BD-rate vs {a}" for a in anchors) + " |", "|" + "---|" * (1 + len(anchors))]
    for model, (bpp, psnr) in curves.items():
        cells = []
        for anchor, (a_bpp, a_psnr) in anchors.items():
            try:
                cells.append("—" if anchor == model else signed(bd_rate(a_bpp, a_psnr, bpp, psnr), 1, " %"))
            except ValueError as exc:
                cells.append(f"n/a ({exc})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for run in (runs[k] for k in sorted(runs)):
        if not run["curve"]:
            continue
        steps = [r["step"] for r in run["curve"]]
        hours = [r["seconds"] / 3600 for r in run["curve"]]
        for row, key in enumerate(("psnr", "bpp_loss")):
            values = [r[key] for r in run["curve"]]
            axes[row][0].plot(steps, values, "-o", markersize=2, label=run["name"])
            axes[row][1].plot(hours, values, "-o", markersize=2, label=run["name"])
    for row, label in enumerate(("validation PSNR (dB)", "validation bpp (estimated)")):
        for col, xlabel in enumerate(("training steps", "hours of training (2-core CPU, 1 thread a run)")):
            axes[row][col].set_xlabel(xlabel)
            axes[row][col].set_ylabel(label)
            axes[row][col].grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    save_figure(fig, path)


def plot_rd_points(runs, references, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for name, ref in references.items():
        ax.plot(ref["bpp"], ref["psnr"], "--" if "published" in name else ":", label=name)
    by_model = {}
    for (model, _), run in sorted(runs.items()):
        by_model.setdefault(model, []).append(run)
    for model, points in by_model.items():
        ax.plot([p["bpp"] for p in points], [p["psnr"] for p in points], "-o", markersize=5, label=model)
    right = max(max(r["bpp"] for r in runs.values()) * 1.5, 0.5)
    shown = [r["psnr"] for r in runs.values()]
    for ref in references.values():
        shown += [q for b, q in zip(ref["bpp"], ref["psnr"], strict=True) if b <= right]
    ax.set_xlim(0, right)
    ax.set_ylim(min(shown) - 1, max(shown) + 1)
    ax.set_xlabel("Bit rate (bpp)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Kodak, equal-budget study")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    runs = read_runs(args.results)
    if not runs:
        raise SystemExit(f"error: no <model>_lambda<lambda>.json results in {args.results}")
    references = {}
    sources = [(args.published / f"{name}.json", label) for name, label in REFERENCES.items()]
    sources += [(args.classical / f"{name}-pillow.json", label) for name, label in CLASSICAL.items()]
    for path, label in sources:
        if path.exists():
            curve = load_rd(path)
            references[label] = {"bpp": curve["bpp"], "psnr": curve["psnr"]}
        elif path.parent == args.published:
            print(f"note: {path} not found: no comparison with {label}", file=sys.stderr)
    sizes = {model: model_size(model, not args.no_macs) for model in sorted({m for m, _ in runs})}
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, args.out / "curves.png")
    plot_rd_points(runs, references, args.out / "rd_kodak.png")
    text = "\n\n".join([
        "# Equal-budget study: Kodak results (scripts/study_report.py)", table(runs, sizes, references),
        bd_table(runs, references),
        "Each row: `python scripts/study.py --models MODEL --lambdas LAMBDA` (same data, crops, batch, steps, schedule "
        "and seed for all); encode / decode seconds are eval.py's means per Kodak image, measured on the machine that "
        "trained (timings beside another run are slower than on an idle machine)."]) + "\n"
    with atomic_write(args.out / "report.md") as tmp:
        Path(tmp).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
