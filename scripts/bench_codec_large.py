"""Coding a large photo in bounded memory: codec.py encode + decode of a 4000x3000 image, peak RSS and time, as JSON.

    python scripts/bench_codec_large.py -o measurements/bench_codec_large.json          # bundled model and csm N=128
    python scripts/bench_codec_large.py --models bundled --size 2000 1500 --threads 2

The image is a mosaic of the Kodak images (``--kodak``, default ``../shared/data/kodak``), mirrored tile by tile and
cropped to ``--size`` W H; where that folder does not exist, a smooth random image (``--synthetic`` forces it). Each
model runs ``codec.py encode`` (which decodes its own file to check it) and then ``codec.py decode`` in fresh
processes, as a user would; the peak RSS of each process (``ru_maxrss`` of the child, torch and the model included)
and its wall time are reported, with seconds and MB per megapixel, and the decoded latents are compared with the
encoder's (``--dump-y-hat``: ``latents_equal``). ``bundled`` is ``checkpoints/csm-small.pth.tar``; ``csm`` is the
paper's csm N=128 M=320 with random weights (the entropy coder's time depends only weakly on the weights; rates of
an untrained model mean nothing, so none are reported for it). Tiling follows codec.py: ``--tile`` is passed on
(default: codec.py's choice, tiles of 512 when the memory estimate exceeds the available memory; ``--max-memory-gb``
is passed on too, so a machine with more memory can measure the tiled path).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_KODAK = REPO.parent / "shared" / "data" / "kodak"
BUNDLED = REPO / "checkpoints" / "csm-small.pth.tar"
MODELS = ("bundled", "csm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    parser.add_argument("--kodak", type=Path, default=DEFAULT_KODAK, help="images of the mosaic")
    parser.add_argument("--synthetic", action="store_true", help="a smooth random image instead of the mosaic")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of codec.py (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=None, help="codec.py --tile (default: codec.py's choice)")
    parser.add_argument("--max-memory-gb", type=float, default=None, help="codec.py --max-memory-gb")
    parser.add_argument("--keep", type=Path, default=None, help="keep the image, files and outputs in this folder")
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if min(args.size) < 1:
        parser.error("--size must be positive")
    return args


def make_image(size, kodak, synthetic, path):
    """Write the test image (PNG) and return a description of it."""
    import numpy as np
    from PIL import Image

    width, height = size
    sources = [] if synthetic or not kodak.is_dir() else sorted(kodak.glob("*.png"))
    if sources:
        rows, used, y = [], 0, 0
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        while y < height:
            x, row_height = 0, 0
            while x < width:
                img = np.asarray(Image.open(sources[used % len(sources)]).convert("RGB"))
                if used // len(sources) % 2:
                    img = img[:, ::-1]  # a second pass over the images: mirrored, not a repeat
                used += 1
                h, w = min(img.shape[0], height - y), min(img.shape[1], width - x)
                canvas[y : y + h, x : x + w] = img[:h, :w]
                x, row_height = x + w, max(row_height, h)
            y += row_height
        Image.fromarray(canvas).save(path)
        return f"mosaic of {used} Kodak images ({kodak}), cropped to {width}x{height}"
    rng = np.random.default_rng(0)
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    noise = rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(path)
    return f"smooth random image {width}x{height} (bicubic of 32-px noise plus Gaussian noise, sigma 6)"


def random_csm_checkpoint(path):
    import torch

    from models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("csm")
    model.update(force=True)
    save_checkpoint(path, model)
    return path


def run_measured(command):
    """(returncode, seconds, peak RSS in bytes, stderr tail) of a child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss * 1024, tail


def bench_model(name, checkpoint, image, folder, args, megapixels):
    import numpy as np

    common = ["--checkpoint", str(checkpoint), "--threads", str(args.threads)]
    if args.max_memory_gb is not None:
        common += ["--max-memory-gb", str(args.max_memory_gb)]
    coded, decoded = folder / f"{name}.csm", folder / f"{name}_decoded.png"
    enc_latents, dec_latents = folder / f"{name}_enc.npy", folder / f"{name}_dec.npy"
    encode = [sys.executable, str(REPO / "codec.py"), "encode", str(image), str(coded), *common,
              "--dump-y-hat", str(enc_latents)]
    if args.tile is not None:
        encode += ["--tile", str(args.tile)]
    decode = [sys.executable, str(REPO / "codec.py"), "decode", str(coded), str(decoded), *common,
              "--dump-y-hat", str(dec_latents)]
    result = {"checkpoint": str(checkpoint)}
    for step, command in (("encode", encode), ("decode", decode)):
        code, seconds, rss, tail = run_measured(command)
        if code:
            result[f"{step}_error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit status {code}"
            return result
        result[step] = {"seconds": seconds, "peak_rss_mb": rss / 1e6, "seconds_per_mp": seconds / megapixels,
                        "peak_rss_mb_per_mp": rss / 1e6 / megapixels,
                        "notes": [line for line in tail.splitlines() if line.startswith("note:")]}
    from utils.bitstream import read_file

    compressed = read_file(coded)
    result.update({
        "tile": compressed.tile, "tile_overlap": compressed.overlap, "tiles": len(compressed.tiles),
        "bytes": coded.stat().st_size,
        "latents_equal": np.load(enc_latents).tobytes() == np.load(dec_latents).tobytes(),
    })
    if name == "bundled":
        from PIL import Image

        original = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64)
        mse = np.mean((original - np.asarray(Image.open(decoded), dtype=np.float64)) ** 2)
        result.update({"bpp": 8 * result["bytes"] / (megapixels * 1e6), "psnr": 10 * np.log10(255**2 / mse)})
    return result


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"large_{args.size[0]}x{args.size[1]}.png"
        description = make_image(args.size, args.kodak, args.synthetic, image)
        megapixels = args.size[0] * args.size[1] / 1e6
        report = {"image": description, "megapixels": megapixels, "threads": args.threads,
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "command": " ".join(["scripts/bench_codec_large.py", *(sys.argv[1:] if argv is None else argv)]),
                  "models": {}}
        for name in args.models:
            checkpoint = BUNDLED if name == "bundled" else random_csm_checkpoint(folder / "csm_random.pth.tar")
            report["models"][name] = bench_model(name, checkpoint, image, folder, args, megapixels)
            print(json.dumps({name: report["models"][name]}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        from utils.image import atomic_write

        with atomic_write(args.output) as tmp:
            tmp.write_text(text + "\n")
    failed = [n for n, r in report["models"].items() if not r.get("latents_equal")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
