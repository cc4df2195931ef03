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
from utils.allocator import map_large_buffers  # noqa: F401 -- codec_io.map_large_buffers
from utils.bitstream import MAX_SIDE, MIN_TILE, MODEL_ID_BYTES, TILE_MULTIPLE, CompressedImage, pack, unpack
from utils.image import ImageReadError, atomic_write, crop_center, load_image_with_note, pad_center
from utils.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, TiledCoder

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
def estimate_peak_memory(model, padded_size, tile=0, overlap=0):
    """Estimated growth of memory, in bytes, while encoding or decoding a ``padded_size`` = (H, W) image
    (multiples of 64) with a loaded model, i.e. what must still be available; in tiles of side ``tile`` with
    ``overlap`` pixels of context (``utils.tiling``) when ``tile`` > 0.

    Two phases, the larger counts: the transforms, whose widest activation is 2N channels at H/2 x W/2 (float32),
    times a factor of the scan backend that runs them; the deterministic entropy path, whose float64 reference
    scan expands B and C per channel, 2 x directions x d_inner x d_state x positions (the context blocks:
    ssm_ratio x context_dim channels at H/16 x W/16; h_s: at most ssm_ratio x 2N at H/32 x W/32), plus the rANS
    coder's lists of every y symbol. Tiled, the transforms run on one tile's window at a time and the entropy path
    on one tile; the images and the whole latent stay in memory. Images, the float64 weight copies and a margin
    come on top.
    """
    cfg = model.config
    height, width = padded_size
    if tile:
        window_h, window_w = min(tile + 2 * overlap, height), min(tile + 2 * overlap, width)  # an inner tile's
        coded_h, coded_w = min(tile, height), min(tile, width)
    else:
        window_h, window_w, coded_h, coded_w = height, width, height, width
    device = next(model.parameters()).device
    activation = 2 * cfg.N * (window_h // 2) * (window_w // 2) * 4
    transforms = _ACTIVATION_FACTOR.get(resolve_backend(device, model.scan_backend), 400) * activation
    positions = (coded_h // 16) * (coded_w // 16)
    scanned = max(cfg.context_dim * positions, 2 * cfg.N * positions // 4)  # channels x positions
    scan = 2 * cfg.scan_directions * int(cfg.ssm_ratio * scanned) * cfg.d_state * 8
    entropy = _SCAN_FACTOR * scan + _SYMBOL_BYTES * cfg.M * positions
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    images = 8 * 3 * height * width * 4  # input, padded input, reconstruction, crops, 8-bit copies
    latents = 3 * cfg.M * (height // 16) * (width // 16) * 4 if tile else 0  # y, y_hat and the decoder's y_hat
    return max(transforms, entropy) + images + latents + _WEIGHT_COPIES * weights + _MARGIN_BYTES


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


def memory_limits(max_memory_gb=None, device="cpu"):
    """[(bytes, source)] that coding must stay under: ``max_memory_gb`` if given, else the available memory (and,
    on CUDA, also the free GPU memory: the estimate is compared with both, a cautious simplification)."""
    if max_memory_gb is not None:
        return [(max_memory_gb * 2**30, "--max-memory-gb")]
    limit, source = available_memory()
    limits = [] if limit is None else [(limit, source)]
    if torch.device(device).type == "cuda":
        limits.append((torch.cuda.mem_get_info(device)[0], "free GPU memory"))
    return limits


def plan_tiles(model, image_size, padded_size, tile=None, max_memory_gb=None, device="cpu",
               overlap=DEFAULT_OVERLAP):
    """Decide how to code an image: returns ``(tile, overlap, estimate in bytes, note or None)``, tile 0 for
    untiled coding.

    ``tile`` None (automatic): untiled when the estimate fits the memory limit, else tiles of ``DEFAULT_TILE``
    (halved until they fit, down to 64), with a note that says so. ``tile`` 0: untiled, never tiles. ``tile`` T:
    tiles of T (tiling an image no larger than T changes nothing but the format's tile fields). Raises
    ``CodecError`` when nothing allowed fits.
    """
    limits = memory_limits(max_memory_gb, device)
    limit, source = min(limits, default=(float("inf"), None))

    def fits(t):
        estimate = estimate_peak_memory(model, padded_size, t, overlap if t else 0)
        return estimate <= limit, estimate

    (h, w), (ph, pw) = image_size, padded_size
    untiled_ok, untiled = fits(0)
    if tile is None:
        if untiled_ok:
            return 0, 0, untiled, None
        candidate = DEFAULT_TILE
        while candidate >= max(MIN_TILE, overlap):
            ok, estimate = fits(candidate)
            if ok:
                note = (f"image {w}x{h} needs about {untiled / 2**30:.1f} GB untiled, over the limit of "
                        f"{limit / 2**30:.1f} GB ({source}): coding it in {candidate}x{candidate} tiles (about "
                        f"{estimate / 2**30:.1f} GB; --tile SIZE to choose, --tile 0 to forbid)")
                return candidate, overlap, estimate, note
            candidate = candidate // 2 // TILE_MULTIPLE * TILE_MULTIPLE
        raise CodecError(
            f"image {w}x{h} (padded {pw}x{ph}) needs about {fits(MIN_TILE)[1] / 2**30:.1f} GB at peak even in "
            f"{MIN_TILE}x{MIN_TILE} tiles, over the limit of {limit / 2**30:.1f} GB ({source}): use a smaller image, "
            "or raise the limit with --max-memory-gb if the estimate is too cautious"
        )
    ok, estimate = fits(tile)
    if not ok:
        how = "untiled (--tile 0)" if tile == 0 else f"in {tile}x{tile} tiles"
        hint = "allow tiles (drop --tile 0)" if tile == 0 else "use smaller tiles (--tile)"
        raise CodecError(
            f"image {w}x{h} (padded {pw}x{ph}) needs about {estimate / 2**30:.1f} GB at peak {how}, over the limit "
            f"of {limit / 2**30:.1f} GB ({source}): {hint}, or raise the limit with --max-memory-gb if the "
            "estimate is too cautious"
        )
    return tile, overlap if tile else 0, estimate, None


def check_memory(model, image_size, padded_size, max_memory_gb=None, device="cpu", tile=0, overlap=0):
    """Raise ``CodecError`` when coding an image (untiled, or in the given tiles) would need more memory than the
    limit (``memory_limits``). Returns the estimate in bytes."""
    estimate = estimate_peak_memory(model, padded_size, tile, overlap)
    for limit, source in memory_limits(max_memory_gb, device):
        if estimate > limit:
            (h, w), (ph, pw) = image_size, padded_size
            how = f"in {tile}x{tile} tiles" if tile else "untiled"
            raise CodecError(
                f"image {w}x{h} (padded {pw}x{ph}) needs about {estimate / 2**30:.1f} GB at peak {how}, over the "
                f"limit of {limit / 2**30:.1f} GB ({source}): raise the limit with --max-memory-gb if the estimate "
                "is too cautious"
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


def read_image(path, model, max_memory_gb=None, device="cpu", tile=None, overlap=DEFAULT_OVERLAP):
    """Check an image file's size against the format's limits and the memory, choose tiles (``plan_tiles``), then
    read it as 8-bit RGB.

    Returns ``((1, 3, H, W) float32 in [0, 1], note on the conversion or None, (tile, overlap), note on tiling or
    None)``; see ``load_image_with_note``. The checks read the header only, so an image too large for the machine
    is refused before its pixels are decoded; they hold whatever the EXIF orientation (the limits and the estimate
    are symmetric in H and W).
    """
    size = probe_image_size(path)
    check_side_limits(size)
    padded = tuple(s + (-s) % PAD_MULTIPLE for s in size)
    tile, overlap, _, tile_note = plan_tiles(model, size, padded, tile, max_memory_gb, device, overlap)
    try:
        with _no_pixel_limit():
            x, note = load_image_with_note(path)
    except ImageReadError as exc:
        raise CodecError(" ".join(str(exc).split())) from None
    return x, note, (tile, overlap), tile_note


def check_side_limits(size):
    """Raise ``CodecError`` for images whose sides the file format cannot hold."""
    height, width = size
    if max(height, width) > MAX_SIDE:
        raise CodecError(f"image {width}x{height}: the .csm format holds sides up to {MAX_SIDE} pixels")


# --- coding ---------------------------------------------------------------------------------------------------
def encode(model, x, tile=0, overlap=DEFAULT_OVERLAP, progress=None):
    """Compress x (1, 3, H, W) in [0, 1]: returns ``(CompressedImage, y_hat)``; x is padded to a multiple of 64
    (``pad_center``) and the padding recorded, so ``decode`` crops back to H x W. ``tile`` > 0 codes it in tiles of
    that side with ``overlap`` pixels of context (``utils.tiling``); ``progress(done, total)`` after each tile."""
    check_side_limits(x.shape[-2:])
    overlap = overlap if tile else 0
    device = next(model.parameters()).device
    x_padded, padding = pad_center(x, PAD_MULTIPLE)
    x_padded = x_padded.to(device)
    if tile:
        out = TiledCoder(model, tile, overlap, progress).compress(x_padded)
        strings = tuple(s for pair in zip(*out["strings"]) for s in pair)  # y, z of each tile in turn
        z_shape = tuple(s // PAD_MULTIPLE for s in x_padded.shape[-2:])
    else:
        out = model.compress(x_padded)
        (y_string,), (z_string,) = out["strings"]
        strings, z_shape = (y_string, z_string), tuple(out["shape"])
    compressed = CompressedImage(
        mode=DETERMINISTIC_MODE,
        model_id=model_id(model),
        size=tuple(x.shape[-2:]),
        padding=tuple(padding),
        z_shape=z_shape,
        strings=strings,
        tile=tile,
        overlap=overlap,
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
    compressed.check_geometry(PAD_MULTIPLE)  # two strings per tile


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


def decode(model, compressed, progress=None):
    """Decompress a checked ``CompressedImage``: returns ``(x_hat (1, 3, H, W) in [0, 1], y_hat)``;
    ``progress(done, total)`` after each tile of a tiled file."""
    check_compatible(model, compressed)
    tiles = compressed.tiles
    y_strings, z_strings = compressed.strings[0::2], compressed.strings[1::2]
    for (_, _, height, width), z_string in zip(tiles, z_strings):
        _check_z_string(model, z_string, (height // PAD_MULTIPLE, width // PAD_MULTIPLE))
    try:
        if compressed.tile:
            coder = TiledCoder(model, compressed.tile, compressed.overlap, progress)
            out = coder.decompress([list(y_strings), list(z_strings)], compressed.padded_size)
        else:
            out = model.decompress([list(y_strings), list(z_strings)], compressed.z_shape)
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


def round_trip(model, x, tile=0, overlap=DEFAULT_OVERLAP, progress=None):
    """Encode x to the file's bytes and decode those bytes, as a decoder will see them, timing both halves
    (``encode``'s tiling arguments). Raises ``CodecError`` if decoding the file does not reproduce the encoder's
    latents."""
    start = time.perf_counter()
    compressed, y_hat = encode(model, x, tile, overlap, progress)
    data = pack(compressed)
    middle = time.perf_counter()
    x_hat, y_hat_decoded = decode(model, unpack(data), progress)
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
