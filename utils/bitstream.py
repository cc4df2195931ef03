"""The compressed-image file format (``.csm``): a small header, the entropy-coded strings, a CRC-32.

Pure standard library and nothing of models, so that a file is checked (and a bad one refused with a one-line
``BitstreamError``) before anything heavy is imported or allocated. All integers are big-endian.

====== ======== ===============================================================================================
offset bytes    field
====== ======== ===============================================================================================
0      4        magic ``89 43 53 4D`` (``\\x89CSM``; the high byte catches 7-bit and text-mode transfers)
4      1        format version (``VERSION``)
5      1        coding mode: how the decoder must compute the entropy parameters (the codec defines the values)
6      16       model id: hash of the model's config and weights (the codec defines it)
22     2        image height H, original, 1..65535
24     2        image width W, original, 1..65535
26     4        padding left, right, top, bottom (one byte each; see ``utils.image.pad_center``)
30     2        z height
32     2        z width
34     1        number of strings n (1..``MAX_STRINGS``)
35     4n       length of each string
35+4n  sum      the strings, in order
end-4  4        CRC-32 (zlib) of every byte before it
====== ======== ===============================================================================================
"""

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\x89CSM"
VERSION = 1
MODEL_ID_BYTES = 16
MAX_SIDE = 65535
MAX_STRINGS = 16

# magic, version, mode, model id, H, W, padding (l, r, t, b), z (h, w), string count
_FIXED = struct.Struct(f">4sBB{MODEL_ID_BYTES}sHH4BHHB")
_LENGTH = struct.Struct(">I")
_CRC = struct.Struct(">I")


class BitstreamError(ValueError):
    """A file that is not a valid compressed image; the message is one line that names the problem."""


@dataclass(frozen=True)
class CompressedImage:
    """Everything a ``.csm`` file holds.

    ``size``: original (H, W); ``padding``: (left, right, top, bottom) added around it before coding;
    ``z_shape``: (h, w) of the hyper-latent; ``strings``: the entropy-coded strings (one ``bytes`` each).
    """

    mode: int
    model_id: bytes
    size: tuple
    padding: tuple
    z_shape: tuple
    strings: tuple

    @property
    def padded_size(self):
        """(H + top + bottom, W + left + right)."""
        left, right, top, bottom = self.padding
        return self.size[0] + top + bottom, self.size[1] + left + right

    def check_geometry(self, stride):
        """Raise ``BitstreamError`` unless the padding is ``pad_center``'s for ``stride`` and the padded image is
        exactly ``z_shape * stride``."""
        (height, width), (z_h, z_w) = self.size, self.z_shape
        left, right, top, bottom = self.padding
        for side, z_side, before, after, name in ((height, z_h, top, bottom, "height"), (width, z_w, left, right, "width")):
            total = (-side) % stride
            if (before, after) != (total // 2, total - total // 2) or side + total != z_side * stride:
                raise BitstreamError(
                    f"inconsistent header: {name} {side} padded by {before}+{after} does not give the z {name} "
                    f"{z_side} x {stride}"
                )


def pack(image):
    """The bytes of a ``.csm`` file holding ``image`` (a ``CompressedImage``); raises ValueError for values the
    format cannot hold."""
    height, width = image.size
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ValueError(f"image {height}x{width} does not fit the format: each side must be 1..{MAX_SIDE}")
    if len(image.model_id) != MODEL_ID_BYTES:
        raise ValueError(f"model id must be {MODEL_ID_BYTES} bytes; got {len(image.model_id)}")
    if not 1 <= len(image.strings) <= MAX_STRINGS:
        raise ValueError(f"1..{MAX_STRINGS} strings fit the format; got {len(image.strings)}")
    body = b"".join(
        [
            _FIXED.pack(MAGIC, VERSION, image.mode, image.model_id, height, width, *image.padding, *image.z_shape,
                        len(image.strings)),
            *(_LENGTH.pack(len(s)) for s in image.strings),
            *image.strings,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data):
    """Parse and check the bytes of a ``.csm`` file; returns a ``CompressedImage`` or raises ``BitstreamError``.

    Checks, in order: not empty, the magic, the version, the header and the announced string lengths against the
    file size (every length is checked before it is used), the CRC-32, then the values (sides >= 1, z shape >= 1).
    """
    size = len(data)
    if size == 0:
        raise BitstreamError("empty file (0 bytes)")
    if data[: len(MAGIC)] != MAGIC[:size]:
        raise BitstreamError(f"not a CSM compressed image (its first bytes are {bytes(data[:4])!r}, not {MAGIC!r})")
    if size <= len(MAGIC):
        raise BitstreamError(f"truncated file: {size} bytes, the header alone takes {_FIXED.size + _CRC.size}")
    if data[4] != VERSION:
        raise BitstreamError(f"format version {data[4]} is not supported (this decoder reads version {VERSION})")
    if size < _FIXED.size + _CRC.size:
        raise BitstreamError(f"truncated file: {size} bytes, the header alone takes {_FIXED.size + _CRC.size}")
    _, _, mode, model_id, height, width, *rest = _FIXED.unpack_from(data)
    padding, z_shape, count = tuple(rest[:4]), tuple(rest[4:6]), rest[6]
    if not 1 <= count <= MAX_STRINGS:
        raise BitstreamError(f"corrupt header: {count} strings announced (1..{MAX_STRINGS} allowed)")
    lengths_end = _FIXED.size + count * _LENGTH.size
    if size < lengths_end + _CRC.size:
        raise BitstreamError(f"truncated file: {size} bytes, the header alone takes {lengths_end + _CRC.size}")
    lengths = [_LENGTH.unpack_from(data, _FIXED.size + i * _LENGTH.size)[0] for i in range(count)]
    expected = lengths_end + sum(lengths) + _CRC.size
    crc_ok = zlib.crc32(data[: size - _CRC.size]) == _CRC.unpack_from(data, size - _CRC.size)[0]
    if expected != size:
        # A truncated file and a damaged length field look alike; the CRC tells only that something is wrong.
        problem = "truncated or corrupt" if size < expected else "corrupt (or extended)"
        crc = "" if crc_ok else ", CRC-32 mismatch"
        raise BitstreamError(f"{problem} file: the header announces {expected} bytes, the file has {size}{crc}")
    if not crc_ok:
        raise BitstreamError("corrupt file: CRC-32 mismatch (a damaged byte in the header or the strings)")
    if height < 1 or width < 1 or min(z_shape) < 1:
        raise BitstreamError(f"corrupt header: image {height}x{width}, z shape {z_shape[0]}x{z_shape[1]}")
    strings, offset = [], lengths_end
    for length in lengths:
        strings.append(bytes(data[offset : offset + length]))
        offset += length
    return CompressedImage(mode, bytes(model_id), (height, width), padding, z_shape, tuple(strings))


def read_file(path):
    """``unpack`` the file at ``path``; errors (a missing or unreadable file too) are ``BitstreamError``s that start
    with the path."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(len(MAGIC))
            if data == MAGIC:  # read the rest only for one of ours: a large foreign file is refused from its head
                data += f.read()
        return unpack(data)
    except BitstreamError as exc:
        raise BitstreamError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise BitstreamError(f"{path}: no such file") from None
    except OSError as exc:
        raise BitstreamError(f"{path}: cannot read ({exc.strerror or exc})") from None
