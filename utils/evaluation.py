"""Evaluation of a learned image codec on a folder of images: real bitstreams, distortion, timing and memory.

Works with any CompressAI-style model (``forward`` -> ``likelihoods``, ``compress`` -> ``strings``/``shape``,
``decompress`` -> ``x_hat``; both with ``y_hat`` for the latent round-trip check, which CompressAI's own architectures
do not return); nothing here knows which architecture it runs. ``eval.py`` is the command line.

Conventions, written into every results JSON (``meta``) so that nobody has to guess them:

- Rate: ``bpp_real`` = bytes of all strings * 8 / pixels of the original (unpadded) image; ``bpp_est`` = sum of
  -log2(likelihoods) of an eval-mode forward pass over the same pixels. ``bpp`` is ``bpp_real``, or ``bpp_est``
  when entropy coding is skipped (``estimate_only``), and the document says which.
- Distortion: ``psnr-rgb`` on the 8-bit rounded images (CompressAI's), ``psnr-float`` on the clamped float
  reconstruction, ``ms-ssim-rgb`` on the 8-bit rounded images (as CompressAI), ``ms-ssim-db`` = -10 log10(1 - v).
- Times in seconds: wall clock of ``compress`` and of ``decompress`` alone, on a padded tensor already on the
  device, with ``torch.cuda.synchronize`` around them on CUDA; the first image is run once untimed (warm-up).
- Round trip: the decoder's ``y_hat`` must equal the encoder's exactly; ``round_trip`` is null (not checked) for a
  model whose compress/decompress return no ``y_hat``.
- Aggregates are means over images of per-image values (PSNR averaged in dB, MS-SSIM dB averaged in dB), except
  peak memory (the maximum over images) and ``round_trip_failures`` (a count; null when nothing was checked).
"""

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.image import (
    ImageReadError,
    atomic_write,
    crop_center,
    list_images,
    load_image_with_note,
    pad_center,
    save_image,
    to_uint8,
)
from utils.metrics import bpp_from_likelihoods, bpp_from_strings, ms_ssim, ms_ssim_db, psnr, psnr_8bit

MIB = 2**20
# Per-image values averaged over images; MS-SSIM is NaN for images under 161 px and averaged over the others.
MEAN_KEYS = ("bpp", "bpp_real", "bpp_est", "psnr-rgb", "psnr-float", "ms-ssim-rgb", "ms-ssim-db",
             "encoding_time", "decoding_time")
NAN_SKIPPING_KEYS = ("ms-ssim-rgb", "ms-ssim-db")
MAX_KEYS = ("peak_memory_encode_mib", "peak_memory_decode_mib", "peak_memory_forward_mib")

AVERAGING = ("mean over images of per-image values (PSNR and MS-SSIM dB averaged on the dB scale; MS-SSIM over "
             "the images of at least 161 px); peak_memory_*: maximum over images; round_trip_failures: count (null "
             "where the model returns no y_hat to check)")
ROUND_TRIP = ("round_trip: the decoded y_hat equals the encoder's y_hat exactly; null (not checked) for models whose "
              "compress/decompress return no y_hat (CompressAI's architectures): their reconstruction is the decoder's")
TIMING = ("wall-clock seconds of model.compress and of model.decompress alone (image reading, padding, host-device "
          "transfer and metrics excluded), torch.cuda.synchronize before and after on CUDA; mean over images; the "
          "first image is run once untimed before the timed runs (warm-up)")
RATE_REAL = "bpp = bpp_real: bytes of the entropy-coded strings (y and z) * 8 / pixels of the unpadded image"
RATE_EST = ("bpp = bpp_est: estimated from the likelihoods of an eval-mode forward pass (NO entropy coding; "
            "--estimate-only), -log2(p) summed / pixels of the unpadded image")


class EvaluationError(RuntimeError):
    """The model failed on an image; the message names the image."""


def warn(message: str) -> None:
    """Print a warning to stderr without breaking tqdm's progress bars."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """Print an informational note to stderr without breaking tqdm's progress bars."""
    tqdm.write(f"note: {message}", file=sys.stderr)


# --- images ---------------------------------------------------------------------------------------------------------
def find_images(folder, limit: int | None = None) -> tuple[list[Path], list[str]]:
    """(image files of `folder` sorted by name, first `limit` of them; names of the other files, not images).

    Raises FileNotFoundError for a missing folder and ValueError for a folder without images (utils.image).
    """
    images = list_images(folder)
    others = sorted(p.name for p in Path(folder).iterdir()
                    if p.is_file() and not p.name.startswith(".") and p not in set(images))
    return images[:limit], others


def check_images(paths: list[Path]) -> tuple[list[Path], list[dict], dict[str, str]]:
    """Read every image once: (readable paths, [{"path", "reason"}] of unreadable ones, {name: conversion note}).

    Unreadable files get a warning naming them, conversions (grayscale, alpha, 16 bit, ...) a note, each once.
    """
    readable, skipped, notes = [], [], {}
    for path in paths:
        try:
            _, conversion = load_image_with_note(path)
        except (ImageReadError, OSError) as err:
            warn(f"skipping {path}: {err}")
            skipped.append({"path": str(path), "reason": str(err)})
            continue
        if conversion:
            note(f"{path.name}: {conversion}")
            notes[path.name] = conversion
        readable.append(path)
    return readable, skipped, notes


def recon_folders(checkpoints: list, root) -> list[Path]:
    """One reconstruction folder per checkpoint under `root`, named after its file (made unique when two clash)."""
    stems = [Path(c).stem for c in checkpoints]
    return [Path(root) / (stem if stems.count(stem) == 1 else f"{i:02d}-{stem}") for i, stem in enumerate(stems)]


# --- measuring ------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall clock measures it; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), wall-clock seconds of it, with the device synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), KiB; OSError where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    # Linux >= 4.0: "5" resets the peak RSS (VmHWM) of this process to its current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory of one step, in MiB: ``start()`` before it, ``stop()`` after it returns the peak (or None).

    CUDA: ``torch.cuda.max_memory_allocated`` (all tensors on the device, model weights included).
    CPU: increase of the process's peak resident set size over its size before the step (Linux, through
    /proc/self/clear_refs and VmHWM); None where that is unavailable.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._rss_before = None
        if device.type == "cuda":
            self.description = ("CUDA torch.cuda.max_memory_allocated during the step (all tensors on the device, "
                                "model weights included), MiB")
            return
        try:
            reset_peak_rss()
            proc_status_kib("VmHWM")
            self.description = ("CPU peak resident set size increase during the step (VmHWM after - VmRSS before, "
                                "peak reset through /proc/self/clear_refs; model weights excluded), MiB")
        except OSError:
            self.description = "unavailable (CPU peak RSS needs Linux /proc/self/clear_refs)"
            self.device = None

    def start(self) -> None:
        if self.device is None:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
            self._rss_before = proc_status_kib("VmRSS")

    def stop(self) -> float | None:
        if self.device is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return (proc_status_kib("VmHWM") - self._rss_before) * 1024 / MIB


def _measured(fn, device, memory):
    """(fn(), seconds, peak MiB) of one step."""
    memory.start()
    result, seconds = timed(fn, device)
    return result, seconds, memory.stop()


def distortion(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """PSNR (8-bit and float) and MS-SSIM (linear and dB) of one 1x3xHxW reconstruction against its original."""
    x_hat = x_hat.clamp(0, 1)
    ms = ms_ssim(to_uint8(x).float() / 255, to_uint8(x_hat).float() / 255).item()
    return {
        "psnr-rgb": psnr_8bit(x, x_hat).item(),
        "psnr-float": psnr(x, x_hat).item(),
        "ms-ssim-rgb": ms,
        "ms-ssim-db": float(ms_ssim_db(ms)) if math.isfinite(ms) else math.nan,
    }


def measure_image(model, x: torch.Tensor, pad: int, memory: PeakMemory, estimate_only: bool = False):
    """Code one 1x3xHxW image (already on the model's device) and measure it: (record, x_hat 1x3xHxW on the device).

    The image is zero-padded centred to a multiple of `pad`, the reconstruction cropped back. Rates are per pixel
    of the unpadded image. The record holds the keys listed in the module docstring, plus ``round_trip`` (decoded
    y_hat equal to the encoder's, exactly; None when the model returns no y_hat) when coding.
    """
    device = x.device
    height, width = x.shape[-2:]
    num_pixels = height * width
    x_padded, padding = pad_center(x, pad)
    with torch.no_grad():
        out_net, _, forward_peak = _measured(lambda: model(x_padded), device, memory)
    bpp_est = bpp_from_likelihoods(out_net["likelihoods"], num_pixels).item()
    record = {"width": width, "height": height, "padded_width": x_padded.shape[-1], "padded_height": x_padded.shape[-2]}
    if estimate_only:
        x_hat = crop_center(out_net["x_hat"], padding).clamp(0, 1)
        record.update({"bpp": bpp_est, "bpp_est": bpp_est, **distortion(x, x_hat),
                       "peak_memory_forward_mib": forward_peak})
        return record, x_hat
    del out_net
    out_enc, enc_time, enc_peak = _measured(lambda: model.compress(x_padded), device, memory)
    out_dec, dec_time, dec_peak = _measured(lambda: model.decompress(out_enc["strings"], out_enc["shape"]),
                                            device, memory)
    bpp_real = bpp_from_strings(out_enc["strings"], num_pixels)
    x_hat = crop_center(out_dec["x_hat"], padding).clamp(0, 1)
    record.update({
        "bpp": bpp_real,
        "bpp_real": bpp_real,
        "bpp_est": bpp_est,
        "num_bytes": round(bpp_real * num_pixels / 8),
        **distortion(x, x_hat),
        "encoding_time": enc_time,
        "decoding_time": dec_time,
        "round_trip": latents_match(out_enc, out_dec),
        "peak_memory_encode_mib": enc_peak,
        "peak_memory_decode_mib": dec_peak,
    })
    if record["round_trip"] is False:
        record["round_trip_max_abs_diff"] = _max_abs_diff(out_dec["y_hat"], out_enc["y_hat"])
    return record, x_hat


def latents_match(out_enc: dict, out_dec: dict) -> bool | None:
    """Whether decompress's y_hat equals compress's exactly; None when either output has no y_hat to compare."""
    if "y_hat" not in out_enc or "y_hat" not in out_dec:
        return None
    return torch.equal(out_dec["y_hat"], out_enc["y_hat"])


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Largest absolute difference of two tensors, None when their shapes differ."""
    return (a - b).abs().max().item() if a.shape == b.shape else None


def evaluate_model(model, paths: list[Path], device: torch.device, pad: int = 64, estimate_only: bool = False,
                   recon_dir=None, label: str = "eval", coder_for=None) -> list[dict]:
    """Measure `model` on every image of `paths` (readable, see `check_images`): one record per image, in order.

    The first image is run once untimed before the timed runs (warm-up: kernels, caches, allocator). A round-trip
    mismatch is warned about (naming the image) and kept in the records, never dropped. Any error of the model on
    an image raises EvaluationError naming the image, so that every RD point averages over the same images.
    ``coder_for(size, padded_size)``, if given, returns ``(coder, fields)`` per image: what codes it (the model,
    or e.g. a tiled coder with the same interface) and fields added to its record.
    """
    model.eval()
    memory = PeakMemory(device)
    records = []

    def run(path, save):
        x = load_image_with_note(path)[0].to(device)
        size = tuple(x.shape[-2:])
        try:
            coder, fields = (model, {}) if coder_for is None else coder_for(size, tuple(s + (-s) % pad for s in size))
            record, x_hat = measure_image(coder, x, pad, memory, estimate_only)
            record.update(fields)
        except Exception as err:  # OOM, backend errors...: reported per checkpoint by the caller
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise EvaluationError(f"{path.name}: {type(err).__name__}: {first}") from err
        if save and recon_dir is not None:
            save_image(x_hat, Path(recon_dir) / f"{path.stem}.png")
        return record

    run(paths[0], save=False)
    for path in tqdm(paths, desc=label, unit="img", file=sys.stderr, dynamic_ncols=True):
        record = {"image": path.name, **run(path, save=True)}
        if record.get("round_trip") is False:
            diff = record["round_trip_max_abs_diff"]
            warn(f"ROUND-TRIP MISMATCH on {path.name} ({label}): decoded y_hat differs from the encoder's "
                 f"({'shape differs' if diff is None else f'max |diff| {diff:.3g}'}); its numbers are those of "
                 "the decoder's output")
        records.append(record)
    return records


# --- aggregation and output -----------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    """Aggregates of one checkpoint's per-image records (see AVERAGING): {key: value} for the keys present."""
    summary = {"num_images": len(records)}
    for key in MEAN_KEYS:
        if key not in records[0]:
            continue
        values = np.array([r[key] for r in records], dtype=np.float64)
        if key in NAN_SKIPPING_KEYS:
            values = values[np.isfinite(values)]
        summary[key] = float(values.mean()) if values.size else math.nan
    for key in MAX_KEYS:
        if key in records[0]:
            values = [r[key] for r in records if r[key] is not None]
            summary[key] = max(values) if values else None
    if "round_trip" in records[0]:
        checked = [r["round_trip"] for r in records if r["round_trip"] is not None]
        summary["round_trip_failures"] = sum(not ok for ok in checked) if checked else None
    return summary


def results_document(points: list[dict], name: str, description: str, estimate_only: bool, meta: dict) -> dict:
    """CompressAI-schema results of evaluated checkpoints, every list sorted by bpp (one entry per checkpoint).

    points: [{"checkpoint": {"path", "lambda", ...}, "summary": summarize(...), "records": [...]}].
    ``results`` holds the CompressAI keys (psnr-rgb, ms-ssim-rgb, bpp, encoding_time, decoding_time) and ours;
    ``checkpoints`` and ``per_image`` follow the same order.
    """
    points = sorted(points, key=lambda p: p["summary"]["bpp"])
    keys = [k for k in ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time", "bpp_real", "bpp_est",
                        "psnr-float", "ms-ssim-db", "round_trip_failures", *MAX_KEYS, "num_images")
            if k in points[0]["summary"]]
    results = {key: [p["summary"][key] for p in points] for key in keys}
    results["lambda"] = [p["checkpoint"].get("lambda") for p in points]
    results["checkpoint"] = [p["checkpoint"]["path"] for p in points]
    return {
        "name": name,
        "description": description,
        "rate": "estimated" if estimate_only else "entropy-coded",
        "meta": {"rate": RATE_EST if estimate_only else RATE_REAL, "averaging": AVERAGING,
                 **({} if estimate_only else {"timing": TIMING, "round_trip": ROUND_TRIP}), **meta},
        "results": results,
        "checkpoints": [p["checkpoint"] for p in points],
        "per_image": [{"checkpoint": p["checkpoint"]["path"], "images": p["records"]} for p in points],
    }


def _json_ready(value):
    """`value` with NaN/inf replaced by None (JSON null) and tuples as lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_json(path, document: dict) -> None:
    """Write `document` as strict JSON (non-finite numbers become null), atomically."""
    text = json.dumps(_json_ready(document), indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _cell(value, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'n/a':>{width}}"
    return f"{value:{width}{fmt}}"


def _columns(estimate_only: bool) -> list[tuple[str, str, str, int]]:
    """(header, key, format, width) of the terminal tables."""
    if estimate_only:
        return [("bpp (est.)", "bpp", ".4f", 10), ("PSNR [dB]", "psnr-rgb", ".3f", 9),
                ("PSNR float [dB]", "psnr-float", ".3f", 15), ("MS-SSIM", "ms-ssim-rgb", ".5f", 8),
                ("MS-SSIM [dB]", "ms-ssim-db", ".3f", 12), ("peak fwd [MiB]", "peak_memory_forward_mib", ".0f", 14)]
    return [("bpp", "bpp", ".4f", 7), ("bpp est", "bpp_est", ".4f", 7), ("PSNR [dB]", "psnr-rgb", ".3f", 9),
            ("PSNR float [dB]", "psnr-float", ".3f", 15), ("MS-SSIM", "ms-ssim-rgb", ".5f", 8),
            ("MS-SSIM [dB]", "ms-ssim-db", ".3f", 12), ("enc [s]", "encoding_time", ".4f", 8),
            ("dec [s]", "decoding_time", ".4f", 8), ("peak enc [MiB]", "peak_memory_encode_mib", ".0f", 14),
            ("peak dec [MiB]", "peak_memory_decode_mib", ".0f", 14)]


def format_table(document: dict) -> str:
    """Terminal summary of a results document: one row per checkpoint (means over images, units in headers)."""
    estimate_only = document["rate"] == "estimated"
    results = document["results"]
    columns = _columns(estimate_only)
    names = [Path(p).name for p in results["checkpoint"]]
    width = max(10, *map(len, names))
    header = f"{'checkpoint':<{width}} {'lambda':>8} " + " ".join(f"{h:>{w}}" for h, _, _, w in columns)
    if not estimate_only:
        header += f" {'round trip':>10}"
    lines = [header]
    for i, name in enumerate(names):
        row = f"{name:<{width}} {_cell(results['lambda'][i], '.4g', 8)} "
        row += " ".join(_cell(results[key][i], fmt, w) for _, key, fmt, w in columns)
        if not estimate_only:
            failures = results["round_trip_failures"][i]
            verdict = "unchecked" if failures is None else "ok" if failures == 0 else f"{failures} FAILED"
            row += f" {verdict:>10}"
        lines.append(row)
    counts = sorted(set(results["num_images"]))
    rate = "estimated from likelihoods, NO entropy coding" if estimate_only else "real bitstreams"
    lines.append(f"means over {'/'.join(map(str, counts))} images; bpp: {rate}"
                 + ("" if estimate_only else "; times in seconds per image, after one warm-up image")
                 + "; peak memory: maximum over images")
    return "\n".join(lines)


def format_per_image(document: dict) -> str:
    """Terminal table of the per-image records of every checkpoint of a results document."""
    columns = _columns(document["rate"] == "estimated")
    blocks = []
    for point in document["per_image"]:
        width = max(10, *(len(r["image"]) for r in point["images"]))
        lines = [f"{point['checkpoint']}:",
                 f"  {'image':<{width}} " + " ".join(f"{h:>{w}}" for h, _, _, w in columns)]
        for r in point["images"]:
            row = " ".join(_cell(r.get(key), fmt, w) for _, key, fmt, w in columns)
            flag = "  ROUND-TRIP MISMATCH" if r.get("round_trip") is False else ""
            lines.append(f"  {r['image']:<{width}} {row}{flag}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --- environment ----------------------------------------------------------------------------------------------------
def software_versions() -> dict:
    """Versions that the numbers depend on: python, torch (and its CUDA), compressai, numpy."""
    import compressai

    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "compressai": compressai.__version__, "numpy": np.__version__}


def device_description(device: torch.device) -> str:
    """The device the numbers were measured on, in words (GPU name, or CPU model and torch threads)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"cpu ({cpu}, {threads} torch thread{'s' if threads != 1 else ''})"


def code_version(repo: Path) -> str | None:
    """``git describe --always --dirty`` of the repository the code runs from, None outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=repo, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
