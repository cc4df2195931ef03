"""Compress an image to a ``.csm`` file and back with a trained CSM model.

    python codec.py encode IN.png OUT.csm [--checkpoint C] [--cuda]
    python codec.py decode IN.csm OUT.png [--checkpoint C] [--cuda]

Without ``--checkpoint`` the bundled ``checkpoints/csm-small.pth.tar`` is used. Outputs are written atomically.
Problems with the input, the checkpoint or the machine end the run with one line ``error: ...`` on stderr and exit
status 1. The file format is ``utils/bitstream.py``; the coding functions are ``utils/codec_io.py``.
"""

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from utils import bitstream

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "csm-small.pth.tar"
SCAN_BACKENDS = ("auto", "cpu", "torch", "cuda", "ref")  # layers.scan.BACKENDS, which would import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, source, target in (("encode", "image (PNG, JPEG, ...)", ".csm file"), ("decode", ".csm file", "PNG")):
        sub = commands.add_parser(name, help=f"{source} -> {target}")
        sub.add_argument("input", type=Path, help=f"the {source} to read")
        sub.add_argument("output", type=Path, help=f"the {target} to write (atomically)")
        sub.add_argument("--checkpoint", type=Path, default=None,
                         help="model checkpoint (default: checkpoints/csm-small.pth.tar in the repository)")
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
            sub.add_argument("--recon", type=Path, default=None, metavar="PNG",
                             help="also write the reconstruction (decoded from the file's bytes) as a PNG")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        parser.error("--max-memory-gb must be > 0")
    return args


def checkpoint_path(args):
    """The checkpoint to load; a missing one is an error that says what to do."""
    if args.checkpoint is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"no --checkpoint given and the default checkpoint {DEFAULT_CHECKPOINT} does not exist: pass "
                "--checkpoint PATH, or train one with train.py and save it there"
            )
        return DEFAULT_CHECKPOINT
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint}: no such file")
    return args.checkpoint


def setup(args, checkpoint):
    """Import the torch side (only now, so that a bad file or checkpoint path is refused in milliseconds), apply the
    device and thread options and load the model. Returns ``(codec_io, model, device)``."""
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")  # raised inside CompressAI
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" when building
    import torch

    from utils import codec_io

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

    x, note = codec_io.read_image(args.input, model, args.max_memory_gb, device)
    if note:
        print(f"note: {args.input}: {note}; the decoded PNG will be 8-bit RGB", file=sys.stderr)
    # The reconstruction is decoded from the file's bytes, as a decoder will see them.
    compressed, data, x_hat, y_hat, encode_s, decode_s = codec_io.round_trip(model, x)

    with atomic_write(args.output) as tmp:
        tmp.write_bytes(data)
    if args.recon is not None:
        save_image(x_hat, args.recon)
    if args.dump_y_hat is not None:
        codec_io.save_array(y_hat, args.dump_y_hat)
    height, width = compressed.size
    print(
        f"{args.input} -> {args.output}: {width}x{height}, {len(data)} bytes, "
        f"{bpp_from_strings([data], height * width):.4f} bpp "
        f"(streams {bpp_from_strings(compressed.strings, height * width):.4f}), "
        f"PSNR {psnr_8bit(x, x_hat.cpu()).item():.2f} dB, encode {encode_s:.2f} s, decode {decode_s:.2f} s"
    )


def decode(args):
    compressed = bitstream.read_file(args.input)  # every structural check, before torch is imported
    codec_io, model, device = setup(args, checkpoint_path(args))
    from utils.image import save_image
    from utils.metrics import bpp_from_strings

    codec_io.check_compatible(model, compressed)
    codec_io.check_memory(model, compressed.size, compressed.padded_size, args.max_memory_gb, device)
    start = time.perf_counter()
    x_hat, y_hat = codec_io.decode(model, compressed)
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
