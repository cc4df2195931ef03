"""The quick start: compress and decompress one image with the bundled CSM checkpoint, next to JPEG and WebP.

    python demo.py                      # a sample photo that matplotlib ships (Grace Hopper, 512x600)
    python demo.py --image photo.png [--quality Q | --checkpoint C] [--out-dir demo_out]

The CSM file is a real ``.csm`` bitstream (``codec.py``'s format), decoded back from its bytes; JPEG and WebP are
encoded by Pillow at the quality whose file size comes closest to the CSM file's, so the rows compare at about
the same bpp.
"""

import argparse
import io
import sys
import time
from pathlib import Path

import matplotlib.cbook
import torch
from PIL import Image

from utils import bundled, codec_io
from utils.image import save_image, to_pil, to_tensor
from utils.metrics import bpp_from_strings, psnr_8bit


def sample_image():
    """A photo shipped with matplotlib (a dependency), so the demo runs without any data."""
    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def pillow_codec(img, fmt, quality):
    """(bytes, decoded RGB tensor, encode s, decode s) of one Pillow encoding."""
    start = time.perf_counter()
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    encode_s = time.perf_counter() - start
    data = buf.getvalue()
    start = time.perf_counter()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    decoded.load()
    decode_s = time.perf_counter() - start
    return data, to_tensor(decoded), encode_s, decode_s


def closest_quality(img, fmt, target_bytes):
    """The quality (1..100) whose file size is closest to ``target_bytes`` (sizes grow with quality)."""
    low, high = 1, 100
    while low < high:
        mid = (low + high) // 2
        if len(pillow_codec(img, fmt, mid)[0]) < target_bytes:
            low = mid + 1
        else:
            high = mid
    candidates = {q for q in (low - 1, low) if 1 <= q <= 100}
    return min(candidates, key=lambda q: abs(len(pillow_codec(img, fmt, q)[0]) - target_bytes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="image to compress (default: a sample photo)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quality", type=int, choices=bundled.QUALITIES, default=None,
                       help="the bundled checkpoint of this quality, higher is better "
                       f"(default: {bundled.DEFAULT_QUALITY})")
    which.add_argument("--checkpoint", type=Path, default=None, help="any model checkpoint instead")
    parser.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="where the outputs are written")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    codec_io.map_large_buffers()  # freed tile buffers go back to the system: a lower peak on large images
    image = args.image or sample_image()
    try:
        checkpoint = args.checkpoint or bundled.by_quality(args.quality or bundled.DEFAULT_QUALITY)
        model, _ = codec_io.load_model(checkpoint)
        x, _, (tile, overlap), tile_note = codec_io.read_image(image, model)
    except (FileNotFoundError, *codec_io.USER_ERRORS) as exc:
        sys.exit(f"error: {exc}")
    height, width = x.shape[-2:]
    pixels = height * width
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if tile_note:
        print(f"note: {tile_note}", file=sys.stderr)
    _, data, x_hat, _, encode_s, decode_s = codec_io.round_trip(model, x, tile, overlap)
    (args.out_dir / "image.csm").write_bytes(data)
    save_image(x_hat, args.out_dir / "image_csm.png")

    rows = [("CSM (" + (model.preset or "model") + ")", len(data), psnr_8bit(x, x_hat).item(), encode_s, decode_s)]
    img = to_pil(x)
    for fmt, ext in (("JPEG", "jpg"), ("WEBP", "webp")):
        quality = closest_quality(img, fmt, len(data))
        blob, decoded, enc_s, dec_s = pillow_codec(img, fmt, quality)
        (args.out_dir / f"image.{ext}").write_bytes(blob)
        rows.append((f"{fmt} q={quality} (Pillow)", len(blob), psnr_8bit(x, decoded).item(), enc_s, dec_s))

    print(f"{image}: {width}x{height}, checkpoint {checkpoint}")
    print(f"{'codec':<26}{'bytes':>9}{'bpp':>8}{'PSNR [dB]':>11}{'encode [s]':>12}{'decode [s]':>12}")
    for name, size, quality_db, enc_s, dec_s in rows:
        bpp = bpp_from_strings([b"\0" * size], pixels)
        print(f"{name:<26}{size:>9}{bpp:>8.3f}{quality_db:>11.2f}{enc_s:>12.3f}{dec_s:>12.3f}")
    print(f"outputs in {args.out_dir}/ (image.csm, image_csm.png, image.jpg, image.webp)")


if __name__ == "__main__":
    main()
