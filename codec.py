"""Compress an image to a ``.csm`` file and back with a trained CSM model.

    python codec.py encode IN.png OUT.csm [--quality Q | --checkpoint C] [--cuda] [--tile SIZE]
    python codec.py decode IN.csm OUT.png [--quality Q | --checkpoint C] [--cuda]

Without ``--checkpoint`` a bundled checkpoint is used (``utils/bundled.py``): ``--quality`` picks one of the bundled
rate points (higher is better quality; the encoder's default is the middle one), and the decoder, given neither
option, picks the bundled checkpoint that the file names. Outputs are written atomically.
An image whose estimated peak memory exceeds what is available is coded in tiles (``utils/tiling.py``; a note says
so, and a progress bar runs over the tiles); ``--tile SIZE`` forces tiles of that side, ``--tile 0`` forbids them.
Problems with the input, the checkpoint or the machine end the run with one line ``error: ...`` on stderr and exit
status 1. The file format is ``utils/bitstream.py``; the coding functions are ``utils/codec_io.py``.
"""

import argparse
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from utils import bitstream, bundled
from utils.cli import overlap_argument, overlap_problem, tile_argument

DEFAULT_CHECKPOINT = bundled.BUNDLED[bundled.DEFAULT_QUALITY].path
SCAN_BACKENDS = ("auto", "cpu", "torch", "cuda", "ref")  # layers.scan.BACKENDS, which would import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, source, target in (("encode", "image (PNG, JPEG, ...)", ".csm file"), ("decode", ".csm file", "PNG")):
        sub = commands.add_parser(name, help=f"{source} -> {target}")
        sub.add_argument("input", type=Path, help=f"the {source} to read")
        sub.add_argument("output", type=Path, help=f"the {target} to write (atomically)")
        which = sub.add_mutually_exclusive_group()
        which.add_argument("--quality", type=int, choices=bundled.QUALITIES, default=None,
                           help="the bundled checkpoint of this quality, higher is better (default: "
                           + (f"{bundled.DEFAULT_QUALITY})" if name == "encode" else "the one the file names)"))
        which.add_argument("--checkpoint", type=Path, default=None, help="any model checkpoint instead")
        sub.add_argument("--cuda", action="store_true", help="run the transforms on the GPU (entropy parameters stay "
                         "on the CPU in float64, so files are portable between devices)")
        sub.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        sub.add_argument("--scan-backend", choices=SCAN_BACKENDS, default="auto",
                         help="selective-scan backend of the transforms (files decode the same with any)")
        sub.add_argument("--max-memory-gb", type=float, default=None,
                         help="refuse images whose estimated peak memory exceeds this (default: the memory "
                         "available now)")
        sub.add_argument("--dump-y-hat", type=Path, default=None, metavar="NPY",
                         help="debugging: also write the decoded latent y_hat as a .npy file")
        if name == "encode":
            sub.add_argument("--tile", type=tile_argument, default=None, metavar="SIZE",
                             help="code in tiles of SIZE x SIZE pixels (a multiple of 64), each with its own "
                             "strings; 0: never tile (default: tiles of 512 only when the memory estimate exceeds "
                             "the limit)")
            sub.add_argument("--tile-overlap", type=overlap_argument, default=None, metavar="PX",
                             help="pixels of context around each tile that the transforms see (a multiple of 16, "
                             "at most the tile side; default: 64); the overlap costs time, not bits")
            sub.add_argument("--recon", type=Path, default=None, metavar="PNG",
                             help="also write the reconstruction (decoded from the file's bytes) as a PNG")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        parser.error("--max-memory-gb must be > 0")
    if args.command == "encode" and args.tile_overlap is not None:
        if args.tile == 0:
            parser.error("--tile-overlap needs tiles (not --tile 0)")
        if args.tile_overlap > (args.tile or 512):
            parser.error(overlap_problem(args.tile_overlap))
    return args


def checkpoint_path(args, model_id=None):
    """The checkpoint to load: ``--checkpoint``, else the bundled one of ``--quality``, else, for a file that names
    ``model_id``, the bundled checkpoint with that id, else the default quality's. A missing one is an error that
    says what to do."""
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint}: no such file")
        return args.checkpoint
    quality = args.quality
    if quality is None and model_id is not None:
        quality = bundled.by_model_id(model_id)
        if quality is None:
            raise FileNotFoundError(
                f"the file was encoded with model {model_id.hex()}, none of the bundled checkpoints (qualities "
                f"{', '.join(map(str, bundled.QUALITIES))}): pass --checkpoint with the checkpoint that encoded it"
            )
    return bundled.by_quality(bundled.DEFAULT_QUALITY if quality is None else quality)


def setup(args, checkpoint):
    """Import the torch side (only now, so that a bad file or checkpoint path is refused in milliseconds), apply the
    device and thread options and load the model. Returns ``(codec_io, model, device)``."""
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")  # raised inside CompressAI
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" when building
    import torch

    from utils import codec_io

    codec_io.map_large_buffers()  # freed tile buffers go back to the system: a lower peak on large images
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cuda and not torch.cuda.is_available():
        raise codec_io.CodecError("--cuda given, but CUDA is not available here")
    device = "cuda" if args.cuda else "cpu"
    model, note = codec_io.load_model(checkpoint, device, args.scan_backend)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return codec_io, model, device


def encode(args):
    codec_io, model, device = setup(args, checkpoint_path(args))
    from utils.image import atomic_write, save_image
    from utils.metrics import bpp_from_strings, psnr_8bit

    from utils.tiling import DEFAULT_OVERLAP

    overlap = DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap
    x, note, (tile, overlap), tile_note = codec_io.read_image(args.input, model, args.max_memory_gb, device,
                                                              args.tile, overlap)
    if note:
        print(f"note: {args.input}: {note}; the decoded PNG will be 8-bit RGB", file=sys.stderr)
    if tile_note:
        print(f"note: {args.input}: {tile_note}", file=sys.stderr)
    # The reconstruction is decoded from the file's bytes, as a decoder will see them.
    with tile_progress("encode, then decode to check") as progress:
        compressed, data, x_hat, y_hat, encode_s, decode_s = codec_io.round_trip(model, x, tile, overlap, progress)

    with atomic_write(args.output) as tmp:
        tmp.write_bytes(data)
    if args.recon is not None:
        save_image(x_hat, args.recon)
    if args.dump_y_hat is not None:
        codec_io.save_array(y_hat, args.dump_y_hat)
    height, width = compressed.size
    tiles = f", {len(compressed.tiles)} tiles of {compressed.tile} (overlap {compressed.overlap})" if tile else ""
    print(
        f"{args.input} -> {args.output}: {width}x{height}{tiles}, {len(data)} bytes, "
        f"{bpp_from_strings([data], height * width):.4f} bpp "
        f"(streams {bpp_from_strings(compressed.strings, height * width):.4f}), "
        f"PSNR {psnr_8bit(x, x_hat.cpu()).item():.2f} dB, encode {encode_s:.2f} s, decode {decode_s:.2f} s"
    )


def decode(args):
    compressed = bitstream.read_file(args.input)  # every structural check, before torch is imported
    codec_io, model, device = setup(args, checkpoint_path(args, compressed.model_id))
    from utils.image import save_image
    from utils.metrics import bpp_from_strings

    codec_io.check_compatible(model, compressed)
    codec_io.check_memory(model, compressed.size, compressed.padded_size, args.max_memory_gb, device,
                          compressed.tile, compressed.overlap)
    start = time.perf_counter()
    with tile_progress("decode") as progress:
        x_hat, y_hat = codec_io.decode(model, compressed, progress)
    decode_s = time.perf_counter() - start
    save_image(x_hat, args.output)
    if args.dump_y_hat is not None:
        codec_io.save_array(y_hat, args.dump_y_hat)
    height, width = compressed.size
    print(
        f"{args.input} -> {args.output}: {width}x{height}, {args.input.stat().st_size} bytes, "
        f"{bpp_from_strings([bitstream.pack(compressed)], height * width):.4f} bpp "
        f"(streams {bpp_from_strings(compressed.strings, height * width):.4f}), decode {decode_s:.2f} s"
    )


@contextmanager
def tile_progress(description):
    """A ``progress(done, total)`` hook that shows a bar over the tiles on stderr (only for images of 2+ tiles)."""
    bar = None

    def progress(done, total):
        nonlocal bar
        if total < 2:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"{description}: tiles", unit="tile", file=sys.stderr, dynamic_ncols=True)
        if done < bar.n:  # the next pass (decoding after encoding)
            bar.reset(total)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def user_errors():
    """Exception types that report a problem with the input, the checkpoint or the machine (one line, exit 1)."""
    codec_io = sys.modules.get("utils.codec_io")  # imported only once the input passed the file checks
    return (bitstream.BitstreamError, FileNotFoundError, *getattr(codec_io, "USER_ERRORS", ()))


def main(argv=None):
    args = parse_args(argv)
    try:
        (encode if args.command == "encode" else decode)(args)
    except MemoryError:
        print("error: out of memory (the estimate was too low: try a smaller image)", file=sys.stderr)
        return 1
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise  # a bug: keep its traceback
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
