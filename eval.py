"""Evaluate CSM checkpoints on a folder of images: real bitstreams, PSNR/MS-SSIM, times, memory, round-trip check.

    python eval.py --checkpoint CKPT [CKPT ...] --data DATA [--cuda] [-o results.json]

Every checkpoint is one RD point; the model is rebuilt from the config stored in the file (train.py's checkpoints
of CompressAI architectures, ``-m compressai:ARCH``, too). By default each image is entropy coded and decoded: bpp
counts the real bytes, PSNR/MS-SSIM use the decoded image, encode and decode times are measured separately
(seconds, after one untimed warm-up image), and the decoded latents are checked against the encoder's (not for
CompressAI's architectures, which return no latents: null in the JSON). --estimate-only skips coding and reports
the likelihood estimate as bpp. The results JSON follows CompressAI's schema (python -m compressai.utils.plot,
scripts/plot_rd.py and utils.rd.load_rd read it); utils/evaluation.py holds the measuring and says every convention.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from layers.scan import BACKENDS, resolve_backend  # noqa: E402
from layers.ss2d import SS2D  # noqa: E402
from models import CSM, PAD_MULTIPLE, CheckpointError, architecture, load_checkpoint, pad_multiple  # noqa: E402
from utils import codec_io  # noqa: E402
from utils.cli import overlap_argument, overlap_problem, positive_int, tile_argument  # noqa: E402
from utils.tiling import DEFAULT_OVERLAP, TiledCoder  # noqa: E402
from utils.evaluation import (  # noqa: E402
    EvaluationError,
    PeakMemory,
    check_images,
    code_version,
    device_description,
    evaluate_model,
    find_images,
    format_per_image,
    format_table,
    note,
    recon_folders,
    results_document,
    software_versions,
    summarize,
    warn,
    write_json,
)


def pad_argument(text: str) -> int:
    """argparse type: a positive multiple of the model's stride (64; 128 is what TCM-family scripts used)."""
    value = int(text)
    if value < PAD_MULTIPLE or value % PAD_MULTIPLE:
        raise argparse.ArgumentTypeError(f"--pad must be a positive multiple of {PAD_MULTIPLE}, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="one or more checkpoint files, one RD point each (the model is rebuilt from each)")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of images (PNG, JPEG, BMP, TIFF, WebP; grayscale/alpha/16-bit become 8-bit RGB)")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU (error if CUDA is unavailable)")
    parser.add_argument("--pad", type=pad_argument, default=PAD_MULTIPLE,
                        help="centred zero padding to a multiple of this, cropped back (default: %(default)s; "
                             "128 to compare with TCM-family scripts)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="skip entropy coding: bpp estimated from the likelihoods, no times, no round-trip check")
    parser.add_argument("-o", "--output", type=Path,
                        help="results JSON (default: results/eval/<name>-<data folder>[-est].json)")
    parser.add_argument("--name", help="curve name in the JSON and in plots (default: the checkpoints' preset)")
    parser.add_argument("--per-image", action="store_true",
                        help="also print a table per image (the JSON always holds the per-image records)")
    parser.add_argument("--save-recon", type=Path, metavar="DIR",
                        help="write reconstructions as 8-bit PNG to DIR/<checkpoint name>/<image>.png")
    parser.add_argument("--scan-backend", choices=BACKENDS, default="auto",
                        help="selective-scan backend (default: %(default)s, the fastest available)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N images (sorted by name)")
    parser.add_argument("--tile", type=tile_argument, default=None, metavar="SIZE",
                        help="CSM models: code every image in tiles of SIZE x SIZE pixels (a multiple of 64; "
                             "utils/tiling.py); 0: never tile (default: tiles of 512 for an image whose memory "
                             "estimate exceeds the available memory, with a note)")
    parser.add_argument("--tile-overlap", type=overlap_argument, default=DEFAULT_OVERLAP, metavar="PX",
                        help="pixels of context around each tile (a multiple of 16; default: %(default)s)")
    args = parser.parse_args(argv)
    if args.tile and args.tile_overlap > args.tile:
        parser.error(overlap_problem(args.tile_overlap))
    return args


def scan_backend_in_use(model, device: torch.device) -> str:
    """The concrete selective-scan backend the model ran with, or a note that it has no SS2D."""
    if not any(isinstance(m, SS2D) for m in model.modules()):
        return "none (model has no SS2D)"
    return resolve_backend(device, model.scan_backend)


def tiling_plan(model, path: Path, device: torch.device, args):
    """evaluate_model's ``coder_for``: per image, the model itself or a ``TiledCoder`` (``codec_io.plan_tiles``:
    --tile, or tiles where the memory estimate exceeds the available memory); records get ``tile`` and
    ``tile_overlap`` (0 untiled). None for models that cannot tile (CompressAI's), which refuse --tile > 0."""
    if not isinstance(model, CSM):
        if args.tile:
            raise CheckpointError(f"{path}: tiled coding (--tile) needs a CSM model, not {model.preset}")
        return None

    def coder_for(size, padded_size):
        tile, overlap, _, message = codec_io.plan_tiles(model, size, padded_size, args.tile, device=device,
                                                        overlap=args.tile_overlap)
        if message:
            note(f"{path.name}: {message}")
        coder = TiledCoder(model, tile, overlap) if tile else model
        return coder, {"tile": tile, "tile_overlap": overlap}

    return coder_for


def evaluate_checkpoint(path: Path, images: list[Path], device: torch.device, args, recon_dir) -> dict:
    """One RD point {"checkpoint", "summary", "records"}; raises CheckpointError or EvaluationError."""
    model = load_checkpoint(path, map_location=device, scan_backend=args.scan_backend)
    if args.pad % pad_multiple(model):
        raise CheckpointError(f"{path}: {model.preset} needs sides padded to a multiple of {pad_multiple(model)}, "
                              f"not of --pad {args.pad}")
    model.update(force=True)
    records = evaluate_model(model, images, device, args.pad, args.estimate_only, recon_dir, label=path.name,
                             coder_for=tiling_plan(model, path, device, args))
    if not args.estimate_only and records[0]["round_trip"] is None:
        note(f"{path.name}: {model.preset} returns no y_hat from compress/decompress: latent round-trip check skipped "
             "(null in the JSON)")
    info = {**model.checkpoint_info, "path": str(path.resolve()), **architecture(model),
            "scan_backend": scan_backend_in_use(model, device)}
    return {"checkpoint": info, "summary": summarize(records), "records": records}


def make_folders(folders) -> None:
    """Create output folders before the (long) evaluation, so that a bad path fails at once."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SystemExit(f"error: cannot create folder {folder}: {err}") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("error: --cuda given but CUDA is not available (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.cuda:
        # The decoder must recompute the encoder's entropy parameters bit for bit: no autotuned kernel choice.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if args.threads:
        torch.set_num_threads(args.threads)
    codec_io.map_large_buffers()  # freed tile buffers go back to the system: a lower peak on large images

    try:
        paths, others = find_images(args.data, args.limit)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if others:
        warn(f"skipping {len(others)} file(s) that are not images (by extension) in {args.data}: "
             + ", ".join(others))
    images, skipped, conversions = check_images(paths)
    if not images:
        raise SystemExit(f"error: none of the {len(paths)} image file(s) in {args.data} could be read")

    folders = recon_folders(args.checkpoint, args.save_recon) if args.save_recon else [None] * len(args.checkpoint)
    make_folders([f for f in folders if f is not None] + ([args.output.parent] if args.output else []))
    points, failed = [], []
    for path, recon_dir in zip(args.checkpoint, folders):
        try:
            points.append(evaluate_checkpoint(path, images, device, args, recon_dir))
        except CheckpointError as err:
            warn(f"skipping checkpoint: {err}")
            failed.append({"path": str(path), "error": str(err)})
        except EvaluationError as err:
            warn(f"skipping checkpoint {path}: failed on image {err}")
            failed.append({"path": str(path), "error": f"failed on image {err}"})
    if not points:
        raise SystemExit(f"error: none of the {len(args.checkpoint)} checkpoint(s) could be evaluated")

    presets = dict.fromkeys(p["checkpoint"]["preset"] or "csm" for p in points)
    name = args.name or "+".join(presets)
    rate = "rates estimated from likelihoods (no entropy coding)" if args.estimate_only else "entropy-coded"
    description = (f"{name} on {args.data.resolve().name} ({len(images)} images), {rate}, centred zero padding "
                   f"to a multiple of {args.pad}, {device_description(device)}")
    meta = {
        "dataset": str(args.data.resolve()), "num_images": len(images), "images": [p.name for p in images],
        "skipped_images": skipped + [{"path": str(args.data / o), "reason": "not an image"} for o in others],
        "conversions": conversions, "pad_multiple": args.pad, "device": device_description(device),
        "torch_threads": torch.get_num_threads(), "scan_backend_requested": args.scan_backend,
        "peak_memory": PeakMemory(device).description, "software": software_versions(),
        "code_version": code_version(REPO), "failed_checkpoints": failed,
        "tiling": (f"--tile {args.tile}" if args.tile is not None else "tiles of 512 where the memory estimate "
                   "exceeds the available memory") + f", --tile-overlap {args.tile_overlap} (see records' tile)",
        "command": shlex.join(["eval.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    document = results_document(points, name, description, args.estimate_only, meta)
    output = args.output or Path("results") / "eval" / (
        f"{name.replace(':', '-')}-{args.data.resolve().name}{'-est' if args.estimate_only else ''}.json")
    if args.per_image:
        print(format_per_image(document) + "\n")
    print(format_table(document))
    try:
        write_json(output, document)
    except OSError as err:
        raise SystemExit(f"error: cannot write {output}: {err}") from None
    failures = sum(f or 0 for f in document["results"].get("round_trip_failures", []))
    if failures:
        warn(f"{failures} ROUND-TRIP MISMATCH(ES): decoded latents differ from the encoder's (see above)")
    if failed:
        warn(f"{len(failed)} of {len(args.checkpoint)} checkpoint(s) could not be evaluated: "
             + ", ".join(f["path"] for f in failed))
    print(f"wrote {output}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
