"""Rate-distortion of Pillow's JPEG, WebP and AVIF encoders on a folder of images, one results JSON per codec.

    python scripts/bench_classical.py --data /path/to/kodak -o results/classical/kodak

Each image is loaded as 8-bit RGB by utils.image.load_image (the same pixels the learned codecs see), encoded at
every quality in memory, decoded, and measured: bpp from the real file size, PSNR on the 8-bit grid
(CompressAI's psnr-rgb) and MS-SSIM. The JSON files follow CompressAI's results schema (lists sorted by bpp,
averages over the images at each quality) and load with utils.rd.load_rd / plot with scripts/plot_rd.py.
"""

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, features
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import positive_int  # noqa: E402
from utils.image import atomic_write, list_images, load_image_with_note, to_pil, to_tensor  # noqa: E402
from utils.metrics import ms_ssim, ms_ssim_db, psnr_8bit  # noqa: E402

# Pillow save() format and options of each codec; "feature" is the Pillow feature that must be compiled in,
# "libraries" the Pillow features whose version names the encoder (the first one known is reported).
CODECS = {
    "jpeg": {"format": "JPEG", "feature": "jpg", "libraries": ("libjpeg_turbo", "jpg"),
             "options": {"subsampling": "4:2:0"},
             "about": "4:2:0 chroma subsampling, baseline, default Huffman tables (optimize=False)"},
    "webp": {"format": "WEBP", "feature": "webp", "libraries": ("webp",), "options": {},
             "about": "lossy, method 4 (Pillow's default), 4:2:0"},
    "avif": {"format": "AVIF", "feature": "avif", "libraries": ("avif",), "options": {},
             "about": "speed 6 (Pillow's default), 4:2:0"},
}
DEFAULT_QUALITIES = [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
MEASURES = ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")


def quality(text: str) -> int:
    """argparse type: an encoder quality in 1..100."""
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"quality must be in 1..100, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of images (PNG, JPEG, BMP, TIFF, WebP)")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=list(CODECS), help="codecs to run")
    parser.add_argument("--qualities", nargs="+", type=quality, default=DEFAULT_QUALITIES,
                        help="encoder qualities, 1..100 (default: %(default)s)")
    parser.add_argument("-o", "--out", type=Path,
                        help="output folder for <codec>-pillow.json (default: results/classical/<data folder name>)")
    parser.add_argument("--limit", type=positive_int, help="use only the first N images of the folder (sorted by name)")
    return parser.parse_args(argv)


def codec_description(codec: str) -> str:
    """One line naming the encoder, its library version and settings, for the JSON's "description"."""
    spec = CODECS[codec]
    library = next((f"{lib} {features.version(lib)}" for lib in spec["libraries"] if features.version(lib)),
                   "library version unknown")
    return f"{spec['format']} via Pillow {Image.__version__} ({library}), {spec['about']}; quality sweep"


def encode_decode(img: Image.Image, codec: str, q: int) -> tuple[int, Image.Image, float, float]:
    """Encode an RGB image in memory at quality q and decode it: (bytes, decoded RGB image, enc s, dec s)."""
    spec = CODECS[codec]
    buffer = io.BytesIO()
    start = time.perf_counter()
    img.save(buffer, format=spec["format"], quality=q, **spec["options"])
    encoding_time = time.perf_counter() - start
    data = buffer.getvalue()
    start = time.perf_counter()
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    decoding_time = time.perf_counter() - start
    return len(data), decoded.convert("RGB"), encoding_time, decoding_time


def measure_image(path: Path, codecs: list[str], qualities: list[int], progress: tqdm) -> dict:
    """Measures of one image at every codec and quality: {codec: {quality: {measure: value}}}."""
    x, note = load_image_with_note(path)
    if note:
        progress.write(f"note: {path.name}: {note}")
    img = to_pil(x)
    num_pixels = img.width * img.height
    measures = {}
    for codec in codecs:
        for q in qualities:
            num_bytes, decoded, encoding_time, decoding_time = encode_decode(img, codec, q)
            x_hat = to_tensor(decoded)
            measures.setdefault(codec, {})[q] = {
                "bpp": num_bytes * 8 / num_pixels,
                "psnr-rgb": psnr_8bit(x, x_hat).item(),
                "ms-ssim-rgb": ms_ssim(x, x_hat).item(),
                "encoding_time": encoding_time,
                "decoding_time": decoding_time,
            }
            progress.update()
    return measures


def mean_or_none(values: list[float]) -> float | None:
    """Mean of the finite values (MS-SSIM is NaN for images under 161 px), None (JSON null) when none is."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def average_results(per_image: list[dict], qualities: list[int]) -> dict:
    """Average one codec's per-image measures ({quality: {measure: value}} each) at each quality.

    Returns CompressAI-schema "results": {"quality": [...], "bpp": [...], ...}, every list sorted by bpp.
    """
    rows = [{"quality": q, **{m: mean_or_none([image[q][m] for image in per_image]) for m in MEASURES}}
            for q in qualities]
    rows.sort(key=lambda row: row["bpp"])
    return {key: [row[key] for row in rows] for key in ("quality", *MEASURES)}


def write_results(path: Path, document: dict) -> None:
    """Write a results JSON atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")


def format_summary(name: str, results: dict) -> str:
    """Text table of one codec's averaged results."""
    lines = [f"{name}:", f"  {'quality':>7} {'bpp':>7} {'PSNR dB':>8} {'MS-SSIM':>8} {'MS-SSIM dB':>10} "
                         f"{'enc ms':>8} {'dec ms':>8}"]
    for i, q in enumerate(results["quality"]):
        ms = results["ms-ssim-rgb"][i]
        ms_text = f"{ms:8.5f} {ms_ssim_db(ms):10.3f}" if ms is not None else f"{'n/a':>8} {'n/a':>10}"
        lines.append(f"  {q:>7} {results['bpp'][i]:7.4f} {results['psnr-rgb'][i]:8.3f} {ms_text} "
                     f"{results['encoding_time'][i] * 1e3:8.1f} {results['decoding_time'][i] * 1e3:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        images = list_images(args.data)[:args.limit]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    out = args.out if args.out is not None else Path("results") / "classical" / args.data.resolve().name
    codecs = []
    for codec in dict.fromkeys(args.codecs):
        if features.check(CODECS[codec]["feature"]):
            codecs.append(codec)
        else:
            print(f"note: this Pillow ({Image.__version__}) has no {codec} support; skipping {codec}")
    if not codecs:
        raise SystemExit("no requested codec is available in this Pillow build")
    qualities = sorted(set(args.qualities))

    with tqdm(total=len(images) * len(codecs) * len(qualities), desc="encode/decode", unit="run") as progress:
        per_image = [measure_image(path, codecs, qualities, progress) for path in images]

    for codec in codecs:
        results = average_results([image[codec] for image in per_image], qualities)
        name = f"{codec}-pillow"
        document = {
            "name": name,
            "description": codec_description(codec),
            "meta": {"dataset": str(args.data), "num_images": len(images), "pillow": Image.__version__},
            "results": results,
        }
        path = out / f"{name}.json"
        write_results(path, document)
        print(format_summary(name, results))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
