"""The codec's library side: one image <-> one ``.csm`` file (``utils.bitstream``) with a CSM model.

``codec.py`` is the command line over these functions. This is the one module of ``utils`` that drives a model: it
takes a loaded model and only calls its ``compress`` / ``decompress``, ``config`` and ``state_dict``.

Every coding runs the model in its deterministic mode (``CSM.deterministic``): the file records that mode, and a
decoder in another process, with another thread count, scan backend or device, rebuilds the encoder's ``y_hat``
bit for bit.
"""

import hashlib
import json
import os
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from layers.scan import ScanBackendError, resolve_backend
from models import CSM, PAD_MULTIPLE, CheckpointError, load_checkpoint
from utils.bitstream import MAX_SIDE, MODEL_ID_BYTES, CompressedImage, pack, unpack
from utils.image import ImageReadError, atomic_write, crop_center, load_image_with_note, pad_center

# The coding modes a file can name (its header's mode byte): how the decoder computes the entropy parameters.
DETERMINISTIC_MODE = 1
CODING_MODES = {DETERMINISTIC_MODE: "float64 CPU entropy parameters on a 2**-8 grid (CSM.deterministic)"}

# Peak memory growth of one encode (compress + the check decode), measured as peak RSS over the RSS before it at
# 256..1024 px with csm-small variants on one thread, with a margin of about 1.3. The transforms peak at about
# 45 (compiled scan) or 170 (PyTorch scan) times their widest activation; the deterministic entropy path at about
# 1.6 times the expanded B and C of a float64 scan over the whole latent (the PyTorch scan it uses holds less).
_ACTIVATION_FACTOR = {"cpu": 60, "cuda": 60, "torch": 220, "ref": 400}  # per scan backend
_SCAN_FACTOR = 2
_SYMBOL_BYTES = 64  # per y element: the rANS coder's Python lists of symbols and indexes
_MARGIN_BYTES = 256 * 2**20
_WEIGHT_COPIES = 3  # float64 copies of the entropy path (2x) and one tensor at a time for hashing

_model_ids = weakref.WeakKeyDictionary()


class CodecError(Exception):
    """A problem with the user's input, checkpoint or machine; the message is one line that names it."""


# What the command line reports as one line (with ``utils.bitstream.BitstreamError``): anything else is a bug.
USER_ERRORS = (CodecError, CheckpointError, ImageReadError, ScanBackendError)


# --- model ----------------------------------------------------------------------------------------------------
def load_model(path, device="cpu", scan_backend="auto"):
    """Load a checkpoint for coding: eval mode, entropy-coder tables present, deterministic mode on.

    Returns ``(model, note)``; ``note`` says when the tables were missing and had to be built (None otherwise).
    """
    model = load_checkpoint(path, map_location=device, scan_backend=scan_backend)
    if not isinstance(model, CSM):
        raise CodecError(f"checkpoint {path} holds {model.preset}: the .csm codec codes with CSM models only (evaluate "
                         "CompressAI architectures with eval.py)")
    # update() without force fills only missing tables: a checkpoint's own tables are kept, since rebuilding them
    # elsewhere could round differently and make files unreadable.
    note = "the checkpoint has no entropy-coder tables; built them with update()" if model.update() else None
    model.deterministic = True
    return model, note


def model_id(model):
    """16 bytes naming a model: sha256 over the canonical JSON of its config and every state-dict tensor's name,
    dtype, shape and bytes, in sorted order. Cached per model object until a tensor changes (or is replaced)."""
    state = model.state_dict()
    fingerprint = tuple((k, t.data_ptr(), t._version, tuple(t.shape)) for k, t in sorted(state.items()))
    cached = _model_ids.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    digest = hashlib.sha256(b"csm-model-id/1\0")
    digest.update(json.dumps(model.config.identity_dict(), sort_keys=True, separators=(",", ":")).encode())
    for name, tensor in sorted(state.items()):
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # The raw bytes in native order, little-endian wherever torch runs in practice; any dtype (bfloat16 too).
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.digest()[:MODEL_ID_BYTES]
    _model_ids[model] = (fingerprint, value)
    return value


# --- memory ---------------------------------------------------------------------------------------------------
def estimate_peak_memory(model, padded_size):
    """Estimated growth of memory, in bytes, while encoding or decoding a ``padded_size`` = (H, W) image
    (multiples of 64) with a loaded model, i.e. what must still be available.

    Two phases, the larger counts: the transforms, whose widest activation is 2N channels at H/2 x W/2 (float32),
    times a factor of the scan backend that runs them; the deterministic entropy path, whose float64 reference
    scan expands B and C per channel, 2 x directions x d_inner x d_state x positions (the context blocks:
    ssm_ratio x context_dim channels at H/16 x W/16; h_s: at most ssm_ratio x 2N at H/32 x W/32), plus the rANS
    coder's lists of every y symbol. Images, the float64 weight copies and a margin come on top.
    """
    cfg = model.config
    height, width = padded_size
    device = next(model.parameters()).device
    activation = 2 * cfg.N * (height // 2) * (width // 2) * 4
    transforms = _ACTIVATION_FACTOR.get(resolve_backend(device, model.scan_backend), 400) * activation
    positions = (height // 16) * (width // 16)
    scanned = max(cfg.context_dim * positions, 2 * cfg.N * positions // 4)  # channels x positions
    scan = 2 * cfg.scan_directions * int(cfg.ssm_ratio * scanned) * cfg.d_state * 8
    entropy = _SCAN_FACTOR * scan + _SYMBOL_BYTES * cfg.M * positions
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    images = 8 * 3 * height * width * 4  # input, padded input, reconstruction, crops, 8-bit copies
    return max(transforms, entropy) + images + _WEIGHT_COPIES * weights + _MARGIN_BYTES


def available_memory():
    """(bytes, source) of the memory this process can use now: MemAvailable of /proc/meminfo, else psutil's
    ``available``; (None, reason) where neither exists."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional: only where /proc/meminfo is missing (macOS, Windows)
    except ImportError:
        return None, "neither /proc/meminfo nor psutil is available"
    return psutil.virtual_memory().available, "psutil.virtual_memory().available"


def check_memory(model, image_size, padded_size, max_memory_gb=None, device="cpu"):
    """Raise ``CodecError`` when coding an image would need more memory than the limit: ``max_memory_gb`` if
    given, else the available memory (and, on CUDA, also the free GPU memory: the estimate is compared with both,
    a cautious simplification). Returns the estimate in bytes."""
    estimate = estimate_peak_memory(model, padded_size)
    if max_memory_gb is not None:
        limits = [(max_memory_gb * 2**30, "--max-memory-gb")]
    else:
        limit, source = available_memory()
        limits = [] if limit is None else [(limit, source)]
        if torch.device(device).type == "cuda":
            limits.append((torch.cuda.mem_get_info(device)[0], "free GPU memory"))
    for limit, source in limits:
        if estimate > limit:
            (h, w), (ph, pw) = image_size, padded_size
            raise CodecError(
                f"image {w}x{h} (padded {pw}x{ph}) needs about {estimate / 2**30:.1f} GB at peak, over the limit of "
                f"{limit / 2**30:.1f} GB ({source}); tiled coding is not implemented: use a smaller image, or "
                "raise the limit with --max-memory-gb if the estimate is too cautious"
            )
    return estimate


# --- images ---------------------------------------------------------------------------------------------------
@contextmanager
def _no_pixel_limit():
    """Lift Pillow's decompression-bomb limit: the codec checks sizes itself, with a message that says why."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def probe_image_size(path):
    """(H, W) of an image file from its header, without decoding pixels (nor the EXIF orientation: for a PNG,
    Pillow decodes the whole image to look for it; the checks below do not depend on it)."""
    path = Path(path)
    if not path.is_file():
        raise CodecError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CodecError(f"{path}: empty file (0 bytes), not an image")
    try:
        with _no_pixel_limit(), Image.open(path) as img:
            width, height = img.size
    # Pillow reports unknown and malformed files as any of these, depending on the format.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CodecError(f"{path}: not an image Pillow can read ({' '.join(str(exc).split()) or type(exc).__name__})")
    return height, width


def read_image(path, model, max_memory_gb=None, device="cpu"):
    """Check an image file's size against the format's limits and the memory, then read it as 8-bit RGB.

    Returns ``((1, 3, H, W) float32 in [0, 1], note on the conversion or None)``; see ``load_image_with_note``.
    The checks read the header only, so an image too large for the machine is refused before its pixels are
    decoded; they hold whatever the EXIF orientation (the limits and the estimate are symmetric in H and W).
    """
    size = probe_image_size(path)
    check_side_limits(size)
    check_memory(model, size, tuple(s + (-s) % PAD_MULTIPLE for s in size), max_memory_gb, device)
    try:
        with _no_pixel_limit():
            return load_image_with_note(path)
    except ImageReadError as exc:
        raise CodecError(" ".join(str(exc).split())) from None


def check_side_limits(size):
    """Raise ``CodecError`` for images whose sides the file format cannot hold."""
    height, width = size
    if max(height, width) > MAX_SIDE:
        raise CodecError(f"image {width}x{height}: the .csm format holds sides up to {MAX_SIDE} pixels")


# --- coding ---------------------------------------------------------------------------------------------------
def encode(model, x):
    """Compress x (1, 3, H, W) in [0, 1]: returns ``(CompressedImage, y_hat)``; x is padded to a multiple of 64
    (``pad_center``) and the padding recorded, so ``decode`` crops back to H x W."""
    check_side_limits(x.shape[-2:])
    device = next(model.parameters()).device
    x_padded, padding = pad_center(x, PAD_MULTIPLE)
    out = model.compress(x_padded.to(device))
    (y_string,), (z_string,) = out["strings"]
    compressed = CompressedImage(
        mode=DETERMINISTIC_MODE,
        model_id=model_id(model),
        size=tuple(x.shape[-2:]),
        padding=tuple(padding),
        z_shape=tuple(out["shape"]),
        strings=(y_string, z_string),
    )
    return compressed, out["y_hat"]


def check_compatible(model, compressed):
    """Raise ``CodecError`` unless ``model`` can decode ``compressed`` (mode, model id, geometry, strings)."""
    if compressed.mode not in CODING_MODES:
        raise CodecError(f"coding mode {compressed.mode} is unknown to this decoder (known: {sorted(CODING_MODES)})")
    own = model_id(model)
    if compressed.model_id != own:
        raise CodecError(
            f"the file was encoded with model {compressed.model_id.hex()}, the checkpoint is model {own.hex()}: "
            "decode with the checkpoint that encoded it"
        )
    compressed.check_geometry(PAD_MULTIPLE)
    if len(compressed.strings) != 2:
        raise CodecError(f"corrupt file: {len(compressed.strings)} strings, expected 2 (y, z)")


def _check_z_string(model, z_string, z_shape):
    """Raise ``CodecError`` unless ``z_string`` is exactly what the encoder writes for the z it decodes to.

    CompressAI's ``EntropyBottleneck.decompress`` checks nothing; decoding once with zero words appended (so a bad
    stream reads zeros, not foreign memory) and re-encoding costs microseconds at z's size.
    """
    bottleneck = model.entropy_bottleneck
    if len(z_string) < 8 or len(z_string) % 4:
        raise CodecError(f"corrupt z stream: {len(z_string)} bytes is not a rANS stream (whole 32-bit words, >= 8)")
    symbols = bottleneck._quantized_cdf.size(0) * z_shape[0] * z_shape[1]
    try:
        z_hat = bottleneck.decompress([z_string + bytes(4 * (symbols + 2))], z_shape)
        again = bottleneck.compress(z_hat)[0]
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CodecError(f"corrupt z stream: {' '.join(str(exc).split())}") from None
    if again != z_string:
        raise CodecError("corrupt z stream: its decoded symbols do not re-encode to it")


def decode(model, compressed):
    """Decompress a checked ``CompressedImage``: returns ``(x_hat (1, 3, H, W) in [0, 1], y_hat)``."""
    check_compatible(model, compressed)
    y_string, z_string = compressed.strings
    _check_z_string(model, z_string, compressed.z_shape)
    try:
        out = model.decompress([[y_string], [z_string]], compressed.z_shape)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CodecError(f"corrupt y stream: {' '.join(str(exc).split())}") from None
    return crop_center(out["x_hat"], compressed.padding), out["y_hat"]


class RoundTrip(NamedTuple):
    compressed: CompressedImage
    data: bytes  # the .csm file
    x_hat: torch.Tensor  # (1, 3, H, W), decoded from ``data``
    y_hat: torch.Tensor  # the encoder's
    encode_s: float  # compress + pack
    decode_s: float  # unpack + decompress


def round_trip(model, x):
    """Encode x to the file's bytes and decode those bytes, as a decoder will see them, timing both halves.
    Raises ``CodecError`` if decoding the file does not reproduce the encoder's latents."""
    start = time.perf_counter()
    compressed, y_hat = encode(model, x)
    data = pack(compressed)
    middle = time.perf_counter()
    x_hat, y_hat_decoded = decode(model, unpack(data))
    decode_s = time.perf_counter() - middle
    if not torch.equal(y_hat_decoded, y_hat):
        raise CodecError("internal error: decoding the file does not reproduce the encoder's latents")
    return RoundTrip(compressed, data, x_hat, y_hat, middle - start, decode_s)


def save_array(array, path):
    """Write a tensor as a ``.npy`` file, atomically (a debugging aid: ``--dump-y-hat``)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array.detach().cpu().numpy())
        f.flush()
        os.fsync(f.fileno())
