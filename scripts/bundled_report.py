"""How the bundled checkpoints (``utils/bundled.py``) compare with JPEG and WebP on Kodak: JSON on stdout.

    python scripts/bundled_report.py [--published ../shared/data/published_rd/kodak] [-o FILE]

Reads each quality's Kodak results, ``checkpoints/<name>_kodak.json`` (written by ``eval.py --per-image -o``, real
bitstreams; the commands are in checkpoints/README.md), and the published JPEG and WebP curves. Per quality: bpp,
PSNR, MS-SSIM, eval.py's encode and decode seconds per image, and the PSNR above each reference curve at the same bpp
(PCHIP over log10 bpp). Over all qualities: the BD-rate and BD-PSNR against each reference, and whether the
bundled models' targets hold (each point at least 1 dB above JPEG's curve, a BD-rate vs JPEG below -20 %).
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import bundled  # noqa: E402
from utils.image import atomic_write  # noqa: E402
from utils.rd import bd_psnr, bd_rate, gain_at_equal_rate, load_rd  # noqa: E402

PUBLISHED = REPO.parent / "shared" / "data" / "published_rd" / "kodak"
REFERENCES = ("jpeg", "webp")  # published_rd/kodak/<name>.json
TARGET_DB_OVER_JPEG = 1.0
TARGET_BD_RATE_VS_JPEG = -20.0


def results_path(entry):
    """eval.py's Kodak results of a bundled checkpoint: checkpoints/<name>_kodak.json."""
    return bundled.FOLDER / (entry.file.removesuffix(".pth.tar") + "_kodak.json")


def read_point(entry):
    path = results_path(entry)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Kodak results for quality {entry.quality} (run the eval.py command "
                                "of checkpoints/README.md)")
    results = json.loads(path.read_text())["results"]
    first = {key: values[0] for key, values in results.items() if isinstance(values, list) and values}
    return {"quality": entry.quality, "checkpoint": entry.file, "lambda": entry.lmbda, "bpp": first["bpp"],
            "psnr": first["psnr-rgb"], "ms_ssim": first.get("ms-ssim-rgb"), "encode_s": first.get("encoding_time"),
            "decode_s": first.get("decoding_time"), "images": first.get("num_images")}


def report(published):
    points = [read_point(bundled.BUNDLED[q]) for q in bundled.QUALITIES]
    references = {name: load_rd(published / f"{name}.json") for name in REFERENCES}
    for point in points:
        for name, curve in references.items():
            gain = gain_at_equal_rate(curve, point["bpp"], point["psnr"])
            point[f"db_over_{name}"] = None if gain is None else round(gain, 3)
    out = {"points": points}
    if len(points) >= 2:
        bpp, psnr = [p["bpp"] for p in points], [p["psnr"] for p in points]
        for name, curve in references.items():
            for key, measure, digits in (("bd_rate_vs_{}_percent", bd_rate, 2), ("bd_psnr_vs_{}_db", bd_psnr, 3)):
                try:
                    out[key.format(name)] = round(measure(curve["bpp"], curve["psnr"], bpp, psnr), digits)
                except ValueError as exc:  # no common interval: the reason, not a number
                    out[key.format(name)] = None
                    out[key.format(name) + "_note"] = str(exc)
    gains = [p["db_over_jpeg"] for p in points]
    out["targets"] = {
        "each_point_1db_over_jpeg": all(g is not None and g >= TARGET_DB_OVER_JPEG for g in gains),
        "bd_rate_vs_jpeg_below_-20_percent": (out.get("bd_rate_vs_jpeg_percent") or 0.0) < TARGET_BD_RATE_VS_JPEG,
    }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=Path, default=PUBLISHED,
                        help="folder of jpeg.json and webp.json (default: ../shared/data/published_rd/kodak)")
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        out = report(args.published)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    text = json.dumps(out, indent=2)
    print(text)
    if args.output is not None:
        with atomic_write(args.output) as tmp:
            tmp.write_text(text + "\n")


if __name__ == "__main__":
    main()
