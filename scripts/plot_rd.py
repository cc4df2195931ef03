r"""Plot RD curves from CompressAI-schema results JSON, with each curve's BD-rate vs an anchor in its label.

    python scripts/plot_rd.py results/kodak/ published_rd/kodak/paper-tcm2023-large_mse.json \
        --anchor published_rd/kodak/vtm.json -o plots/kodak --metric both

writes plots/kodak_psnr.{png,pdf} and plots/kodak_msssim.{png,pdf} and prints the BD-rate tables.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.rd import (bd_rate_table, format_bd_table, has_metric, load_rd, load_rd_paths, plot_rd,  # noqa: E402
                      save_figure)

# Metric name on the command line and in results JSON -> file name suffix of its plot.
PLOT_SUFFIXES = {"psnr-rgb": "psnr", "ms-ssim-rgb": "msssim"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="results JSON files, or folders of them (*.json)")
    parser.add_argument("--anchor", type=Path, help="results JSON of the BD-rate anchor, e.g. vtm.json; "
                        "without it the plots carry no BD-rates")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output prefix: writes PREFIX_psnr.png/.pdf and PREFIX_msssim.png/.pdf")
    parser.add_argument("--metric", choices=[*PLOT_SUFFIXES, "both"], default="both", help="which plots to draw")
    parser.add_argument("--title", help="title of the plots")
    return parser.parse_args(argv)


def plot_metric(curves: list[dict], anchor: dict | None, metric: str, out: Path, title: str | None) -> None:
    """Print the BD-rate table of `metric` and write its plot as OUT_<suffix>.png and .pdf."""
    for curve in curves:
        if not has_metric(curve, metric):
            print(f"note: {curve['name']} ({curve['path']}) has no {metric} values; left out of that plot")
    curves = [c for c in curves if has_metric(c, metric)]
    if not curves:
        print(f"note: no input has {metric} values; no {metric} plot")
        return
    if anchor is not None and not has_metric(anchor, metric):
        print(f"note: anchor {anchor['name']} has no {metric} values; {metric} plot without BD-rates")
        anchor = None
    bd_rates = None
    if anchor is not None:
        rows = bd_rate_table(anchor, curves, metric)
        print(format_bd_table(rows, anchor["name"], metric))
        bd_rates = [row["bd_rate"] for row in rows]
    fig = plot_rd(curves, metric, anchor=anchor, bd_rates=bd_rates, title=title)
    for extension in ("png", "pdf"):
        path = out.parent / f"{out.name}_{PLOT_SUFFIXES[metric]}.{extension}"
        save_figure(fig, path)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        anchor = load_rd(args.anchor) if args.anchor is not None else None
        curves = load_rd_paths(args.inputs, exclude=args.anchor)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    metrics = list(PLOT_SUFFIXES) if args.metric == "both" else [args.metric]
    for metric in metrics:
        plot_metric(curves, anchor, metric, args.out, args.title)


if __name__ == "__main__":
    main()
