"""The compressed-image file format (``.csm``): a small header, the entropy-coded strings, a CRC-32.

Pure standard library and nothing of models, so that a file is checked (and a bad one refused with a one-line
``BitstreamError``) before anything heavy is imported or allocated. All integers are big-endian.

Version 2 (written now; version 1 files still read):

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
30     2        z height (of the whole padded image)
32     2        z width
34     2        tile side T in pixels, a multiple of 64; 0: one tile, the whole padded image
36     2        tile context (overlap) in pixels around each tile, a multiple of 16, at most T; 0 when T is 0
38     4        number of strings n: 2 per tile, ``y, z`` of each tile in row-major tile order
42     4n       length of each string
42+4n  sum      the strings, in order
end-4  4        CRC-32 (zlib) of every byte before it
====== ======== ===============================================================================================

Version 1 is version 2 without the tile fields and with a one-byte string count at offset 34 (1..16): one tile.
The tiles cover the padded image in a grid of T x T squares from the top left (the last row and column narrower,
still multiples of 64); ``CompressedImage.tiles`` lists them, so the decoder derives every tile's z shape.
"""

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\x89CSM"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_ID_BYTES = 16
MAX_SIDE = 65535
TILE_MULTIPLE = 64  # tile sides: whole z positions of the model (stride 64)
OVERLAP_MULTIPLE = 16  # tile context: whole y positions (stride 16)
MIN_TILE = 64
MAX_STRINGS_V1 = 16
# Version 2: two strings per tile, at most one tile per 64 x 64 pixels of the largest image.
MAX_STRINGS = 2 * (-(-(MAX_SIDE + 1) // MIN_TILE)) ** 2

# magic, version, mode, model id, H, W, padding (l, r, t, b), z (h, w); then per version the rest of the header
_COMMON = struct.Struct(f">4sBB{MODEL_ID_BYTES}sHH4BHH")
_TAIL = {1: struct.Struct(">B"), 2: struct.Struct(">HHI")}  # v1: string count; v2: tile, overlap, string count
_LENGTH = struct.Struct(">I")
_CRC = struct.Struct(">I")


class BitstreamError(ValueError):
    """A file that is not a valid compressed image; the message is one line that names the problem."""


def tile_grid(padded_size, tile):
    """The tiles of a padded (H, W) image (multiples of 64) for tile side ``tile`` (0: the whole image), row-major:
    a list of (top, left, height, width) in pixels."""
    height, width = padded_size
    if tile == 0:
        return [(0, 0, height, width)]
    return [(top, left, min(tile, height - top), min(tile, width - left))
            for top in range(0, height, tile) for left in range(0, width, tile)]


@dataclass(frozen=True)
class CompressedImage:
    """Everything a ``.csm`` file holds.

    ``size``: original (H, W); ``padding``: (left, right, top, bottom) added around it before coding;
    ``z_shape``: (h, w) of the hyper-latent of the whole padded image; ``strings``: the entropy-coded strings (one
    ``bytes`` each), ``y, z`` per tile; ``tile``: tile side in pixels (0: one tile, the whole image); ``overlap``:
    pixels of context around each tile that the transforms saw (see ``utils.tiling``).
    """

    mode: int
    model_id: bytes
    size: tuple
    padding: tuple
    z_shape: tuple
    strings: tuple
    tile: int = 0
    overlap: int = 0

    @property
    def padded_size(self):
        """(H + top + bottom, W + left + right)."""
        left, right, top, bottom = self.padding
        return self.size[0] + top + bottom, self.size[1] + left + right

    @property
    def tiles(self):
        """(top, left, height, width) of each tile, in pixels of the padded image, in the order of the strings."""
        return tile_grid(self.padded_size, self.tile)

    def check_geometry(self, stride):
        """Raise ``BitstreamError`` unless the padding is ``pad_center``'s for ``stride``, the padded image is
        exactly ``z_shape * stride`` and the file holds two strings per tile."""
        (height, width), (z_h, z_w) = self.size, self.z_shape
        left, right, top, bottom = self.padding
        for side, z_side, before, after, name in ((height, z_h, top, bottom, "height"), (width, z_w, left, right, "width")):
            total = (-side) % stride
            if (before, after) != (total // 2, total - total // 2) or side + total != z_side * stride:
                raise BitstreamError(
                    f"inconsistent header: {name} {side} padded by {before}+{after} does not give the z {name} "
                    f"{z_side} x {stride}"
                )
        tiles = len(self.tiles)
        if len(self.strings) != 2 * tiles:
            raise BitstreamError(f"inconsistent header: {len(self.strings)} strings for {tiles} tile(s) (2 each)")


def check_tiling(tile, overlap):
    """The problem with a (tile, overlap) pair as one line, or None when the format holds it."""
    if tile == 0:
        return None if overlap == 0 else f"overlap {overlap} without tiles"
    if tile < MIN_TILE or tile % TILE_MULTIPLE:
        return f"tile side {tile} is not a positive multiple of {TILE_MULTIPLE}"
    if overlap % OVERLAP_MULTIPLE or overlap > tile:
        return f"tile overlap {overlap} is not a multiple of {OVERLAP_MULTIPLE} between 0 and the tile side {tile}"
    return None


def pack(image, version=VERSION):
    """The bytes of a ``.csm`` file holding ``image`` (a ``CompressedImage``); raises ValueError for values the
    format cannot hold. ``version=1`` writes the old layout (one tile only), for files that older decoders read."""
    height, width = image.size
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ValueError(f"image {height}x{width} does not fit the format: each side must be 1..{MAX_SIDE}")
    if len(image.model_id) != MODEL_ID_BYTES:
        raise ValueError(f"model id must be {MODEL_ID_BYTES} bytes; got {len(image.model_id)}")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"format version {version} does not exist (versions: {READABLE_VERSIONS})")
    problem = check_tiling(image.tile, image.overlap)
    if problem:
        raise ValueError(problem)
    limit = MAX_STRINGS_V1 if version == 1 else MAX_STRINGS
    if not 1 <= len(image.strings) <= limit:
        raise ValueError(f"1..{limit} strings fit format version {version}; got {len(image.strings)}")
    if version == 1 and image.tile:
        raise ValueError("format version 1 holds no tiles")
    tail = (len(image.strings),) if version == 1 else (image.tile, image.overlap, len(image.strings))
    body = b"".join(
        [
            _COMMON.pack(MAGIC, version, image.mode, image.model_id, height, width, *image.padding, *image.z_shape),
            _TAIL[version].pack(*tail),
            *(_LENGTH.pack(len(s)) for s in image.strings),
            *image.strings,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data):
    """Parse and check the bytes of a ``.csm`` file; returns a ``CompressedImage`` or raises ``BitstreamError``.

    Checks, in order: not empty, the magic, the version, the header and the announced string lengths against the
    file size (every length is checked before it is used), the CRC-32, then the values (sides >= 1, z shape >= 1,
    the tile fields).
    """
    size = len(data)
    if size == 0:
        raise BitstreamError("empty file (0 bytes)")
    if data[: len(MAGIC)] != MAGIC[:size]:
        raise BitstreamError(f"not a CSM compressed image (its first bytes are {bytes(data[:4])!r}, not {MAGIC!r})")
    header = _COMMON.size + _TAIL[VERSION].size + _CRC.size
    if size <= len(MAGIC):
        raise BitstreamError(f"truncated file: {size} bytes, the header alone takes {header}")
    version = data[4]
    if version not in READABLE_VERSIONS:
        raise BitstreamError(f"format version {version} is not supported (this decoder reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
    tail = _TAIL[version]
    header = _COMMON.size + tail.size + _CRC.size
    if size < header:
        raise BitstreamError(f"truncated file: {size} bytes, the header alone takes {header}")
    _, _, mode, model_id, height, width, *rest = _COMMON.unpack_from(data)
    padding, z_shape = tuple(rest[:4]), tuple(rest[4:6])
    if version == 1:
        (count,), tile, overlap, limit = tail.unpack_from(data, _COMMON.size), 0, 0, MAX_STRINGS_V1
    else:
        tile, overlap, count = tail.unpack_from(data, _COMMON.size)
        limit = MAX_STRINGS
    if not 1 <= count <= limit:
        raise BitstreamError(f"corrupt header: {count} strings announced (1..{limit} allowed)")
    lengths_start = _COMMON.size + tail.size
    lengths_end = lengths_start + count * _LENGTH.size
    if size < lengths_end + _CRC.size:
        raise BitstreamError(f"truncated file: {size} bytes, the header alone takes {lengths_end + _CRC.size}")
    lengths = [_LENGTH.unpack_from(data, lengths_start + i * _LENGTH.size)[0] for i in range(count)]
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
    problem = check_tiling(tile, overlap)
    if problem:
        raise BitstreamError(f"corrupt header: {problem}")
    strings, offset = [], lengths_end
    for length in lengths:
        strings.append(bytes(data[offset : offset + length]))
        offset += length
    return CompressedImage(mode, bytes(model_id), (height, width), padding, z_shape, tuple(strings), tile, overlap)


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
