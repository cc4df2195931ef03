"""Compress / decompress time of one image for CSM, its lighter variant and TCM at the same N/M, as JSON (CPU).

    python scripts/bench_codec.py --image ../shared/data/kodak/kodim01.png              # N=128, M=320 and small
    python scripts/bench_codec.py --image IMG --configs 128:320 --models csm tcm --repeats 3

Every model is timed against the last one named (the baseline, ``tcm`` by default): ``ratio_over_baseline``. The
models take turns (one round trip each per round), so that load from elsewhere on a shared machine hits them alike.
``small`` builds each preset with the small widths of ``csm-small`` / ``tcm-small`` (``models.registry.SMALL``).

Untrained weights: the time of an entropy coder depends only weakly on the weights (symbol counts are fixed by the
image size), so this measures the architecture. Times are seconds, medians over ``--repeats`` after one warm-up.
``compress_parts_s`` / ``decompress_parts_s`` split each time between the networks (``PARTS``, timed by forward
hooks in the same rounds) and ``coding_and_rest``: the rANS coding, quantization and everything between the calls
(medians part by part, so they add up to about the median total).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from layers.conv import winograd_available  # noqa: E402
from layers.scan import resolve_backend  # noqa: E402
from models import build_model  # noqa: E402
from models.registry import SMALL  # noqa: E402
from utils.evaluation import write_json  # noqa: E402
from utils.image import load_image, pad_center  # noqa: E402
from utils.metrics import bpp_from_strings  # noqa: E402

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak" / "kodim01.png"


# The networks of a model whose time the report splits out: part name -> the model's modules that make it up.
PARTS = {
    "g_a": lambda model: [model.g_a],
    "h_a": lambda model: [model.h_a],
    "h_s": lambda model: [model.h_mean_s, model.h_scale_s],
    "entropy_model": lambda model: _slice_networks(model.entropy_model),
    "g_s": lambda model: [model.g_s],
}
REST = "coding_and_rest"


def _slice_networks(entropy_model):
    """The per-slice networks of the channel-wise entropy model (context blocks, mean/scale transforms, LRP): the
    members of its module lists, which its per-slice function calls."""
    return [net for child in entropy_model.children() if isinstance(child, torch.nn.ModuleList) for net in child]


@contextlib.contextmanager
def part_timer(model):
    """Accumulate the wall time of every call of each part's modules into the yielded {part: seconds} dict."""
    seconds = dict.fromkeys(PARTS, 0.0)
    started = {}  # module -> perf_counter() at the start of its current call
    handles = []
    for part, modules in PARTS.items():
        for module in modules(model):
            def start(module, args):
                started[module] = time.perf_counter()

            def stop(module, args, output, part=part):
                seconds[part] += time.perf_counter() - started.pop(module)

            handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def split_parts(seconds, total):
    """{part: seconds} of the parts that ran, plus ``REST``: the total less their sum."""
    parts = {part: s for part, s in seconds.items() if s > 0}
    return {**parts, REST: total - sum(parts.values())}


def code_once(model, x):
    """(compress seconds, decompress seconds, compressed, decompressed, compress parts, decompress parts) of one
    round trip; the parts as ``split_parts``."""
    with part_timer(model) as seconds:
        start = time.perf_counter()
        enc = model.compress(x)
        middle = time.perf_counter()
        enc_parts = split_parts(seconds, middle - start)
        seconds.update(dict.fromkeys(seconds, 0.0))
        dec = model.decompress(enc["strings"], enc["shape"])
        end = time.perf_counter()
        dec_parts = split_parts(seconds, end - middle)
    return middle - start, end - middle, enc, dec, enc_parts, dec_parts


def median_parts(rounds):
    """Per-part medians over rounds of ``split_parts`` dicts, rounded like the totals."""
    return {part: round(statistics.median(r[part] for r in rounds), 3) for part in rounds[0]}


def time_codecs(models, x, repeats):
    """Median compress and decompress seconds of every model (after one warm-up each) and the real bpp.

    The models take turns, one round trip each per round, so that a change in the machine's load while the
    benchmark runs (a shared machine) affects them alike and their ratio stays meaningful."""
    times = {name: ([], [], [], []) for name in models}
    last = {}
    with torch.no_grad():
        for model in models.values():
            model.eval().update(force=True)
            code_once(model, x)
        for _ in range(repeats):
            for name, model in models.items():
                enc_s, dec_s, enc, dec, enc_parts, dec_parts = code_once(model, x)
                for series, value in zip(times[name], (enc_s, dec_s, enc_parts, dec_parts)):
                    series.append(value)
                last[name] = enc, dec
    results = {}
    for name, model in models.items():
        enc, dec = last[name]
        results[name] = {
            "compress_s": round(statistics.median(times[name][0]), 3),
            "decompress_s": round(statistics.median(times[name][1]), 3),
            "compress_runs_s": [round(t, 3) for t in times[name][0]],
            "decompress_runs_s": [round(t, 3) for t in times[name][1]],
            "compress_parts_s": median_parts(times[name][2]),
            "decompress_parts_s": median_parts(times[name][3]),
            "bpp_real": round(bpp_from_strings(enc["strings"], x.shape[-2] * x.shape[-1]), 4),
            "exact": bool(torch.equal(enc["y_hat"], dec["y_hat"])),
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="image to code (default: Kodak kodim01)")
    parser.add_argument("--models", nargs="+", default=["csm", "csm-lite", "tcm"],
                        help="presets to compare; the last is the baseline of the ratios")
    parser.add_argument(
        "--configs", nargs="+", default=["128:320", "small"], help="N:M pairs, or 'small' for the small presets"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--scan-backend", default="auto", help="selective-scan backend")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"image {args.image} not found; pass --image")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, _ = pad_center(load_image(args.image), 64)
    report = {
        "image": str(args.image),
        "padded_size": list(x.shape[-2:]),
        "threads": args.threads,
        "scan_backend": resolve_backend("cpu", args.scan_backend),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "winograd_convolutions": winograd_available(),
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "THP_MEM_ALLOC"))},
        "configs": [],
    }
    for spec in args.configs:
        overrides = dict(SMALL) if spec == "small" else dict(zip(("N", "M"), map(int, spec.split(":"))))
        entry = {"config": spec, "N": overrides["N"], "M": overrides["M"], "models": {}}
        torch.manual_seed(0)
        models = {name: build_model(name, scan_backend=args.scan_backend, **overrides) for name in args.models}
        entry["models"] = time_codecs(models, x, args.repeats)
        del models
        for name, result in entry["models"].items():
            print(f"{name} {spec}: {result}", file=sys.stderr)
        baseline = entry["models"][args.models[-1]]
        entry["baseline"] = args.models[-1]
        entry["ratio_over_baseline"] = {
            name: {
                "compress": round(result["compress_s"] / baseline["compress_s"], 3),
                "decompress": round(result["decompress_s"] / baseline["decompress_s"], 3),
            }
            for name, result in entry["models"].items()
            if name != args.models[-1]
        }
        report["configs"].append(entry)
    if args.output:
        write_json(args.output, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
