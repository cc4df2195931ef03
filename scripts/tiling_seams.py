"""How visible are tile seams? PSNR near the tile boundaries against PSNR everywhere, tiled vs untiled, as JSON.

    python scripts/tiling_seams.py --checkpoint checkpoints/csm-small.pth.tar --data ../shared/data/kodak \\
        --configs 0:0 512:64 512:0 256:64 256:0 -o measurements/tiling_seams_kodak.json

Each configuration ``TILE:OVERLAP`` (0:0 is untiled) reconstructs every image with an eval-mode forward pass
(``TiledCoder.forward``: the latents rounded as coding rounds them, no entropy coding) and pools the squared error
of the 8-bit reconstructions over all images in three sets of pixels: within ``--band`` pixels of the lines x or y
= 512 k of the padded image (the seams of 512 tiles), within ``--band`` of the lines at 256 + 512 k (the extra seams
of 256 tiles), and everywhere. An untiled reconstruction is the reference for what those bands cost anyway.
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import load_checkpoint  # noqa: E402
from utils.evaluation import find_images  # noqa: E402
from utils.image import atomic_write, crop_center, load_image_with_note, pad_center  # noqa: E402
from utils.tiling import TiledCoder  # noqa: E402


def configuration(text):
    tile, _, overlap = text.partition(":")
    return int(tile), int(overlap or 0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder of images")
    parser.add_argument("--configs", type=configuration, nargs="+", default=[(0, 0), (512, 64), (512, 0)],
                        metavar="TILE:OVERLAP", help="default: 0:0 512:64 512:0")
    parser.add_argument("--band", type=int, default=8, help="pixels on each side of a seam line (default: 8)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="the first N images only")
    parser.add_argument("-o", "--output", type=Path)
    return parser.parse_args(argv)


def seam_masks(padded_size, padding, band):
    """{"512": mask, "256": mask} of the unpadded image: pixels near the 512-grid lines and near the 256-only ones."""
    height, width = padded_size
    masks = {}
    for name, lines in (("512", lambda n: range(512, n, 512)), ("256", lambda n: range(256, n, 512))):
        mask = torch.zeros(height, width, dtype=torch.bool)
        for x in lines(width):
            mask[:, max(x - band, 0) : x + band] = True
        for y in lines(height):
            mask[max(y - band, 0) : y + band, :] = True
        masks[name] = crop_center(mask[None, None], padding)[0, 0]
    return masks


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    model.update(force=True)
    model.eval()
    paths = find_images(args.data, args.limit)[0]
    sums = {config: {"512": [0.0, 0], "256": [0.0, 0], "all": [0.0, 0]} for config in args.configs}
    for path in paths:
        x = load_image_with_note(path)[0]
        x_padded, padding = pad_center(x, 64)
        masks = seam_masks(x_padded.shape[-2:], padding, args.band)
        masks["all"] = torch.ones(x.shape[-2:], dtype=torch.bool)
        for config in args.configs:
            coder = TiledCoder(model, *config) if config[0] else model
            with torch.no_grad():
                x_hat = crop_center(coder(x_padded)["x_hat"], padding).clamp(0, 1)
            error = ((torch.round(x_hat * 255) - torch.round(x * 255)) ** 2).mean(1)[0]
            for name, mask in masks.items():
                sums[config][name][0] += error[mask].sum().item()
                sums[config][name][1] += int(mask.sum())
        print(path.name, file=sys.stderr, flush=True)

    def psnr(total, count):
        return 10 * math.log10(255**2 * count / total) if count and total else None

    report = {
        "checkpoint": str(args.checkpoint), "data": str(args.data), "images": len(paths), "band_px": args.band,
        "psnr_db": {f"{tile}:{overlap}": {"seam_band_512_grid": psnr(*s["512"]), "seam_band_256_only": psnr(*s["256"]),
                                          "all": psnr(*s["all"])} for (tile, overlap), s in sums.items()},
        "command": " ".join(["scripts/tiling_seams.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with atomic_write(args.output) as tmp:
            tmp.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
