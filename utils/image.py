"""Image files in and out, 8-bit quantisation and padding to a multiple of the model's stride.

Every image enters the code base through `load_image`, which turns any file Pillow can read into the same
thing: an 8-bit RGB picture, returned as a 1x3xHxW float32 tensor in [0, 1]. Nothing here knows about models.
"""

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# What each Pillow mode becomes, said once per file by callers that report conversions.
_MODE_NOTES = {
    "L": "grayscale (L) replicated to RGB",
    "1": "bilevel (1) expanded to RGB",
    "P": "palette (P) expanded to RGB",
    "CMYK": "CMYK converted to RGB by Pillow's formula (no ICC colour management)",
}
_SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow decodes 16-bit colour PNGs to 8 bits by keeping the high byte of each sample, the byte its raw mode
# names. Decoding the same data once more with the little-endian raw mode returns the low bytes instead.
_PNG16_LOW_BYTE_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


class ImageReadError(ValueError):
    """A file that is missing image data or that Pillow cannot decode."""


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Map 16-bit samples (any shape) to 8 bits as round(v / 257), which sends 257*k back to k exactly."""
    return np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _png16_rawmode(img: Image.Image) -> str | None:
    """Raw mode of a not yet loaded 16-bit RGB or RGBA PNG ("RGB;16B", "RGBA;16B"); None for any other image."""
    rawmode = img.tile[0][3] if img.format == "PNG" and len(img.tile) == 1 else None
    return rawmode if rawmode in _PNG16_LOW_BYTE_RAWMODES else None


def _decode_png16(path: Path, rawmode: str) -> np.ndarray:
    """Full-depth samples of a 16-bit RGB(A) PNG with raw mode `rawmode`: HxWxC uint16 (C = 3 or 4)."""
    planes = []
    for byte_rawmode in (rawmode, _PNG16_LOW_BYTE_RAWMODES[rawmode]):
        with Image.open(path) as img:
            codec, extents, offset, _ = img.tile[0]
            img.tile = [(codec, extents, offset, byte_rawmode)]
            img.load()
            planes.append(np.asarray(img).astype(np.uint16))
    high, low = planes
    return high * 256 + low


def _rgb8(img: Image.Image, path: Path) -> tuple[Image.Image, str | None]:
    """Convert an opened image to an 8-bit RGB image; returns it and a note on the conversion (None if none).

    Alpha is dropped, not composited over a background: the stored colour values are what a codec sees.
    16-bit data (I;16 and I grayscale, 16-bit RGB/RGBA PNG) becomes 8-bit as round(v / 257); Pillow itself
    keeps only the high byte of 16-bit gray+alpha PNGs (opened as RGBA), which are left to it.
    """
    rawmode = _png16_rawmode(img)
    if rawmode is not None:
        note = f"16-bit PNG ({img.mode}) scaled to 8 bits as round(v/257)"
        if img.mode == "RGBA":
            note += ", alpha dropped (not composited)"
        return Image.fromarray(_sixteen_to_eight(_decode_png16(path, rawmode)[..., :3]), "RGB"), note
    img.load()
    if img.mode == "RGB":
        return img, None
    if img.mode in _SIXTEEN_BIT_GRAY_MODES:
        gray = _sixteen_to_eight(np.asarray(img))
        note = f"16-bit grayscale ({img.mode}) scaled to 8 bits as round(v/257) and replicated to RGB"
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB"), note
    if any(band in ("A", "a") for band in img.getbands()):
        return img.convert("RGBA").convert("RGB"), f"alpha of {img.mode} dropped (not composited)"
    return img.convert("RGB"), _MODE_NOTES.get(img.mode, f"mode {img.mode} converted to RGB by Pillow")


def _apply_orientation(rgb: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip `rgb` as EXIF orientation `orientation` (1..8) asks, through ImageOps.exif_transpose."""
    # exif_transpose reads the tag from the image it is given, and rgb may be a fresh image without metadata.
    rgb.getexif()[ExifTags.Base.Orientation] = orientation
    return ImageOps.exif_transpose(rgb)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> 1x3xHxW float32 tensor in [0, 1] (value k becomes k/255)."""
    return to_float(to_uint8_tensor(img)).unsqueeze(0)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> 3xHxW uint8 tensor."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode}")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # HxWx3 -> 3xHxW


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (value k becomes k/255), same shape."""
    return pixels.to(torch.float32).div(255.0)


def load_image_with_note(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """Read any image file as 8-bit RGB: (1x3xHxW float32 in [0, 1], note on the conversion or None); see
    `load_rgb8` for the conversions."""
    pixels, note = load_rgb8(path)
    return to_float(pixels).unsqueeze(0), note


def load_rgb8(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """Read any image file as 8-bit RGB: (3xHxW uint8 tensor, note on the conversion or None).

    Grayscale is replicated to three channels, palettes are expanded, CMYK is converted by Pillow's formula,
    alpha is dropped (not composited), 16-bit samples become round(v / 257) and the EXIF orientation is applied,
    so that every caller (training data, evaluation, classical codecs) sees the same pixels for the same file.
    Raises FileNotFoundError if `path` does not exist and ImageReadError if it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            # _rgb8 first: it reads the undecoded tile, and getexif() decodes PNGs to look for an eXIf chunk.
            rgb, note = _rgb8(img, path)
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            rgb = rgb.copy()  # detach the pixels from the file, which closes here
    except FileNotFoundError:
        raise
    # Pillow reports truncated or malformed files as OSError, SyntaxError or ValueError depending on the format.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err
    if orientation in range(2, 9):
        rgb = _apply_orientation(rgb, orientation)
        note = "; ".join(filter(None, [note, f"EXIF orientation {orientation} applied"]))
    return to_uint8_tensor(rgb), note


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a 1x3xHxW float32 tensor in [0, 1]; see `load_image_with_note` for conversions."""
    return load_image_with_note(path)[0]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (PNG, JPEG, BMP, TIFF, WebP by extension, any case) directly in `folder`, sorted by name.

    Raises FileNotFoundError if the folder does not exist and ValueError if it holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    # Names starting with "." are skipped: macOS leaves "._name.png" resource forks that are not images.
    images = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not images:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {folder}")
    return images


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step, on error it is removed.

    Readers never see a half-written file, and an interrupted run leaves the previous version in place. The file
    gets the permissions of a plainly created one (0666 less the umask), not mkstemp's owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round a float tensor in [0, 1] (any shape) to the 8-bit grid: uint8 values 0..255, same shape.

    Large tensors (over 2**22 elements) go through blocks of rows into the output, so that the float temporaries
    stay small; the values are the same."""
    x = x.detach()
    if x.numel() <= 1 << 22 or x.dim() < 2:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    rows = max(1, (1 << 22) // (x.numel() // x.shape[-2]))
    for top in range(0, x.shape[-2], rows):
        out[..., top : top + rows, :] = (x[..., top : top + rows, :].clamp(0, 1) * 255).round()
    return out


def to_pil(x: torch.Tensor) -> Image.Image:
    """1x3xHxW or 3xHxW float tensor in [0, 1] -> 8-bit RGB PIL image (values rounded by `to_uint8`)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_pil takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"to_pil expects 3xHxW or 1x3xHxW, got shape {tuple(x.shape)}")
    return Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy(), "RGB")


def save_image(x: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a 1x3xHxW or 3xHxW tensor in [0, 1] as an 8-bit RGB PNG, atomically (see `atomic_write`)."""
    img = to_pil(x)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def pad_center(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad a BxCxHxW tensor evenly on both sides so that H and W become multiples of `multiple`.

    Returns the BxCxH'xW' padded tensor and padding = (left, right, top, bottom) as F.pad takes it; the odd pixel
    of an odd total goes right/bottom. `crop_center(x_padded, padding)` returns the original exactly.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return F.pad(x, padding, mode="constant", value=0.0), padding


def crop_center(x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo `pad_center`: remove padding = (left, right, top, bottom) from a BxCxH'xW' tensor."""
    left, right, top, bottom = padding
    height, width = x.shape[-2:]
    return x[..., top:height - bottom, left:width - right]
