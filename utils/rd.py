"""Rate-distortion curves: loading CompressAI-schema JSON, Bjontegaard deltas and RD plots.

A curve is the dict `load_rd` returns: {"name", "description", "path", "bpp", "psnr", "ms-ssim"}, lists sorted by
bpp, "psnr"/"ms-ssim" None when the file has no such values. MS-SSIM is stored linear (0..1) and compared and
plotted in dB, -10*log10(1 - v), the scale on which learned-compression papers show it.

BD-rate/BD-PSNR follow the piecewise-cubic convention of recent papers and of the `bjontegaard` package's
method="pchip" (tests check agreement to 1e-9): each curve is interpolated with a monotone piecewise-cubic Hermite
polynomial (PCHIP) through its points, log10(rate) as a function of quality for BD-rate, quality as a function
of log10(rate) for BD-PSNR, integrated exactly over the interval that both curves cover.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.interpolate import PchipInterpolator

from utils.image import atomic_write
from utils.metrics import ms_ssim_db

# Accepted names of each metric, in results JSON and on the command line, and the curve key they map to.
METRIC_KEYS = {"psnr-rgb": "psnr", "psnr": "psnr", "ms-ssim-rgb": "ms-ssim", "ms-ssim": "ms-ssim"}
METRIC_LABELS = {"psnr": "PSNR (dB)", "ms-ssim": "MS-SSIM (dB)"}
# Some published files (CompressAI's paper-*.json) give MS-SSIM only in dB.
_MS_SSIM_DB_KEYS = ("ms-ssim-db-rgb", "ms-ssim-db")


def _metric_key(metric: str) -> str:
    """Curve key ("psnr" or "ms-ssim") of a metric name such as "psnr-rgb"; ValueError for unknown names."""
    if metric not in METRIC_KEYS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRIC_KEYS)}")
    return METRIC_KEYS[metric]


def _float_list(values, key: str, path: Path) -> list[float]:
    """JSON list of numbers (null allowed, read as NaN) -> list of float; ValueError naming file and key."""
    if not isinstance(values, list):
        raise ValueError(f"{path}: results[{key!r}] is not a list")
    try:
        return [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: results[{key!r}] holds a non-number: {err}") from err


def _first_series(results: dict, names: tuple[str, ...], path: Path) -> list[float] | None:
    """Values of the first of `names` present in `results`, or None when none is."""
    for name in names:
        if name in results:
            return _float_list(results[name], name, path)
    return None


def load_rd(path: str | os.PathLike) -> dict:
    """Read one CompressAI-schema results JSON into a curve dict (see module docstring); extra fields ignored.

    Accepts "psnr-rgb" or "psnr", and "ms-ssim-rgb" or "ms-ssim" (linear) or "ms-ssim-db-rgb" (dB, converted
    to linear). Points are sorted by bpp. Raises ValueError naming the file when it does not fit the schema.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or "bpp" not in results:
        raise ValueError(f"{path}: no 'results' object with a 'bpp' list (CompressAI results schema)")
    bpp = _float_list(results["bpp"], "bpp", path)
    series = {"psnr": _first_series(results, ("psnr-rgb", "psnr"), path),
              "ms-ssim": _first_series(results, ("ms-ssim-rgb", "ms-ssim"), path)}
    ms_ssim_in_db = _first_series(results, _MS_SSIM_DB_KEYS, path)
    if series["ms-ssim"] is None and ms_ssim_in_db is not None:
        series["ms-ssim"] = [1 - 10 ** (-v / 10) for v in ms_ssim_in_db]
    for key, values in series.items():
        if values is not None and len(values) != len(bpp):
            raise ValueError(f"{path}: {len(values)} {key} values for {len(bpp)} bpp values")
    order = sorted(range(len(bpp)), key=bpp.__getitem__)
    curve = {"name": data.get("name") or path.stem, "description": data.get("description", ""), "path": str(path)}
    curve["bpp"] = [bpp[i] for i in order]
    curve.update({key: None if v is None else [v[i] for i in order] for key, v in series.items()})
    return curve


def load_rd_paths(paths: list[str | os.PathLike], exclude: str | os.PathLike | None = None) -> list[dict]:
    """Load curves from JSON files and folders (every *.json in a folder, sorted), skipping the file `exclude`.

    `exclude` lets a folder of results be plotted against an anchor that lives in the same folder.
    """
    excluded = Path(exclude).resolve() if exclude is not None else None
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise ValueError(f"no *.json results in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"results file or folder not found: {path}")
    return [load_rd(f) for f in files if f.resolve() != excluded]


def has_metric(curve: dict, metric: str) -> bool:
    """Whether `curve` has values for `metric` ("psnr-rgb", "ms-ssim-rgb", ...)."""
    return curve[_metric_key(metric)] is not None


def rd_points(curve: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(bpp, quality) arrays of a curve, quality on the comparison scale: PSNR in dB, MS-SSIM in dB."""
    key = _metric_key(metric)
    if curve[key] is None:
        raise ValueError(f"{curve['name']} ({curve['path']}) has no {key} values")
    values = np.asarray(curve[key], dtype=np.float64)
    return np.asarray(curve["bpp"], dtype=np.float64), ms_ssim_db(values) if key == "ms-ssim" else values


def _clean_curve(rate, quality, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Sort an RD curve by rate and keep the points where both rate and quality strictly increase.

    A point that costs more bits than a kept one without better quality (a duplicate or a non-monotone
    measurement) is dominated and dropped; so are non-finite values and rates <= 0 (log10 needs > 0).
    PCHIP needs at least 2 points: raises ValueError naming `role` ("anchor"/"test") otherwise.
    """
    rate, quality = np.asarray(rate, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    if rate.shape != quality.shape or rate.ndim != 1:
        raise ValueError(f"{role}: rate and quality must be 1-D of the same length, got {rate.shape}, {quality.shape}")
    valid = np.isfinite(rate) & np.isfinite(quality) & (rate > 0)
    rate, quality = rate[valid], quality[valid]
    kept = []
    for i in np.lexsort((-quality, rate)):  # by rate; at equal rate the best quality comes first and is kept
        if not kept or (rate[i] > rate[kept[-1]] and quality[i] > quality[kept[-1]]):
            kept.append(i)
    if len(kept) < 2:
        raise ValueError(f"{role}: piecewise-cubic BD needs >= 2 RD points with increasing rate and quality, "
                         f"got {len(kept)}")
    return rate[kept], quality[kept]


def _mean_gap(x_anchor, y_anchor, x_test, y_test, axis: str) -> float:
    """Mean of y_test(x) - y_anchor(x) over the x interval both curves cover, each PCHIP-interpolated.

    x arrays strictly increasing. Raises ValueError when the x ranges (named `axis`) do not overlap.
    """
    low, high = max(x_anchor[0], x_test[0]), min(x_anchor[-1], x_test[-1])
    if high <= low:
        raise ValueError(f"the curves do not overlap in {axis}: anchor [{x_anchor[0]:.4g}, {x_anchor[-1]:.4g}], "
                         f"test [{x_test[0]:.4g}, {x_test[-1]:.4g}]")
    area_test = PchipInterpolator(x_test, y_test).integrate(low, high)
    area_anchor = PchipInterpolator(x_anchor, y_anchor).integrate(low, high)
    return float((area_test - area_anchor) / (high - low))


def bd_rate(anchor_bpp, anchor_metric, test_bpp, test_metric) -> float:
    """Bjontegaard delta rate of test vs anchor, in percent (negative: test needs fewer bits for equal quality).

    100 * (10**mean(log10 R_test(q) - log10 R_anchor(q)) - 1), the mean taken over the common quality interval,
    log10-rate as a PCHIP function of quality. Inputs: 1-D sequences, any order (see `_clean_curve`).
    """
    rate_a, quality_a = _clean_curve(anchor_bpp, anchor_metric, "anchor")
    rate_t, quality_t = _clean_curve(test_bpp, test_metric, "test")
    gap = _mean_gap(quality_a, np.log10(rate_a), quality_t, np.log10(rate_t), "quality")
    return (10**gap - 1) * 100


def bd_psnr(anchor_bpp, anchor_metric, test_bpp, test_metric) -> float:
    """Bjontegaard delta quality of test vs anchor, in the metric's unit (dB for PSNR; positive: test is better).

    Mean of Q_test(r) - Q_anchor(r) over the common log10-rate interval, quality as a PCHIP function of log10 rate.
    """
    rate_a, quality_a = _clean_curve(anchor_bpp, anchor_metric, "anchor")
    rate_t, quality_t = _clean_curve(test_bpp, test_metric, "test")
    return _mean_gap(np.log10(rate_a), quality_a, np.log10(rate_t), quality_t, "log10 rate")


def gain_at_equal_rate(reference: dict, bpp: float, psnr: float) -> float | None:
    """PSNR of one point minus the curve `reference`'s ({"bpp", "psnr"} lists) at the same bpp, PCHIP over log10
    bpp; None when the bpp lies outside the curve."""
    rates, quality = np.asarray(reference["bpp"], float), np.asarray(reference["psnr"], float)
    order = np.argsort(rates)
    rates, quality = rates[order], quality[order]
    if not rates[0] <= bpp <= rates[-1]:
        return None
    return float(psnr - PchipInterpolator(np.log10(rates), quality)(np.log10(bpp)))


def bd_rate_curves(anchor: dict, test: dict, metric: str = "psnr-rgb") -> float:
    """BD-rate in percent of curve `test` vs curve `anchor` on `metric` (MS-SSIM compared in dB)."""
    return bd_rate(*rd_points(anchor, metric), *rd_points(test, metric))


def bd_rate_files(anchor_json: str | os.PathLike, test_json: str | os.PathLike, metric: str = "psnr-rgb") -> float:
    """BD-rate in percent of the results file `test_json` vs `anchor_json` on `metric`."""
    return bd_rate_curves(load_rd(anchor_json), load_rd(test_json), metric)


def bd_rate_table(anchor: dict, curves: list[dict], metric: str) -> list[dict]:
    """BD-rate of each curve vs `anchor`: rows {"name", "bd_rate": percent or None, "note": why None, or None}."""
    rows = []
    for curve in curves:
        try:
            rows.append({"name": curve["name"], "bd_rate": bd_rate_curves(anchor, curve, metric), "note": None})
        except ValueError as err:
            rows.append({"name": curve["name"], "bd_rate": None, "note": str(err)})
    return rows


def format_bd_table(rows: list[dict], anchor_name: str, metric: str) -> str:
    """Text table of `bd_rate_table` rows, one line per curve, for printing."""
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"BD-rate vs {anchor_name} on {metric} (PCHIP, negative = fewer bits):"]
    for row in rows:
        value = f"{row['bd_rate']:+8.2f} %" if row["bd_rate"] is not None else f"     n/a ({row['note']})"
        lines.append(f"  {row['name']:<{width}} {value}")
    return "\n".join(lines)


def _zoom_to_curves(ax, curves: list[dict], anchor: dict, metric: str) -> None:
    """Limit the axes to the bpp range of `curves` (5 % margins), so a wide anchor does not squash them."""
    points = [rd_points(c, metric) for c in curves]
    low = min(bpp.min() for bpp, _ in points)
    high = max(bpp.max() for bpp, _ in points)
    margin = 0.05 * (high - low or high)  # a curve of a single rate still gets a visible margin
    anchor_bpp, anchor_quality = rd_points(anchor, metric)
    shown = [q[(bpp >= low - margin) & (bpp <= high + margin)] for bpp, q in [*points, (anchor_bpp, anchor_quality)]]
    quality = np.concatenate(shown)
    quality = quality[np.isfinite(quality)]
    q_margin = 0.05 * (quality.max() - quality.min() or 1.0)
    ax.set_xlim(max(low - margin, 0), high + margin)
    ax.set_ylim(quality.min() - q_margin, quality.max() + q_margin)


def plot_rd(curves: list[dict], metric: str, anchor: dict | None = None,
            bd_rates: list[float | None] | None = None, title: str | None = None) -> Figure:
    """Quality-vs-bpp figure of `curves` (each must have `metric`), the anchor dashed in black.

    bd_rates: BD-rate percent (or None) of each curve, in the order of `curves`, added to its legend label.
    Built on matplotlib's Figure object (Agg for PNG), without pyplot: no GUI backend or global state involved.
    """
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if anchor is not None:
        ax.plot(*rd_points(anchor, metric), "k--o", markersize=3, label=f"{anchor['name']} (anchor)")
    for curve, bd in zip(curves, bd_rates or [None] * len(curves), strict=True):
        label = curve["name"] if bd is None else f"{curve['name']} ({bd:+.2f} %)"
        ax.plot(*rd_points(curve, metric), "-o", markersize=3, label=label)
    if anchor is not None:
        _zoom_to_curves(ax, curves, anchor, metric)
    ax.set_xlabel("Bit rate (bpp)")
    ax.set_ylabel(METRIC_LABELS[_metric_key(metric)])
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` to `path` atomically, the format taken from the suffix (.png at 150 dpi, .pdf, ...)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150)
