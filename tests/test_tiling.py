"""Tiled coding (utils/tiling.py): exact round trips over several tiles, the version-2 header and version 1 files,
refusals of damaged tiled files, the automatic choice of tiles, codec.py and eval.py with --tile."""

import ctypes
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model, save_checkpoint
from tests.helpers import TINY, eval_main, torch_threads
from tests.test_codec import assert_one_line_error, run_codec
from utils import bitstream, codec_io
from utils.bitstream import BitstreamError, CompressedImage
from utils.tiling import TiledCoder, window


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model("csm-small", **TINY)
    model.update(force=True)
    model.eval()
    model.deterministic = True
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("tiling") / "tiny.pth.tar", model)


@pytest.fixture(scope="module")
def image():
    """An odd-sized image (padded to 192 x 320): 3 x 5 tiles of 64, 2 x 3 of 128."""
    return torch.rand(1, 3, 150, 270, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def tiled(model, image):
    """(file bytes, CompressedImage, encoder's y_hat) of ``image`` in tiles of 128 with 32 pixels of context."""
    compressed, y_hat = codec_io.encode(model, image, tile=128, overlap=32)
    return bitstream.pack(compressed), compressed, y_hat


def test_windows_grow_tiles_and_stop_at_the_edges():
    assert window((128, 128, 128, 128), 32, (384, 512)) == (96, 96, 192, 192)
    assert window((0, 0, 128, 128), 32, (384, 512)) == (0, 0, 160, 160)
    assert window((256, 384, 128, 128), 64, (384, 512)) == (192, 320, 192, 192)
    assert bitstream.tile_grid((192, 320), 128) == [(0, 0, 128, 128), (0, 128, 128, 128), (0, 256, 128, 64),
                                                   (128, 0, 64, 128), (128, 128, 64, 128), (128, 256, 64, 64)]
    assert bitstream.tile_grid((192, 320), 0) == [(0, 0, 192, 320)]


@pytest.mark.parametrize("tile, overlap", [(64, 0), (64, 48), (128, 32), (128, 128)])
def test_tiled_round_trip_is_exact_over_several_tiles(model, image, tile, overlap):
    """Odd sizes, several tiles, with and without context: the file's decoded latents equal the encoder's."""
    compressed, y_hat = codec_io.encode(model, image, tile=tile, overlap=overlap)
    assert (compressed.tile, compressed.overlap) == (tile, overlap)
    assert len(compressed.tiles) == {64: 15, 128: 6}[tile] and len(compressed.strings) == 2 * len(compressed.tiles)
    data = bitstream.pack(compressed)
    assert data[4] == bitstream.VERSION == 2 and struct.unpack(">HH", data[34:38]) == (tile, overlap)
    x_hat, decoded = codec_io.decode(model, bitstream.unpack(data))
    assert torch.equal(decoded, y_hat) and y_hat.shape == (1, TINY["M"], 12, 20)
    assert x_hat.shape == image.shape and 0 <= x_hat.min() and x_hat.max() <= 1


def test_one_tile_is_untiled_coding(model, image):
    """A tile as large as the image: the same strings and latents as untiled coding, only the header differs."""
    untiled, y_hat = codec_io.encode(model, image)
    one, y_one = codec_io.encode(model, image, tile=320, overlap=64)
    assert one.strings == untiled.strings and torch.equal(y_one, y_hat) and len(one.tiles) == 1
    assert one.tile == 320 and untiled.tile == 0


def test_tiled_estimate_and_reconstruction_match_the_real_coding(model, image, tiled):
    """TiledCoder as utils.evaluation sees it: the likelihood estimate is near the real rate, and
    compress/decompress give the same latents and picture as the file."""
    from utils.image import pad_center
    from utils.metrics import bpp_from_likelihoods, bpp_from_strings

    data, compressed, y_hat = tiled
    coder = TiledCoder(model, 128, 32)
    x_padded, _ = pad_center(image, 64)
    estimate = bpp_from_likelihoods(coder(x_padded)["likelihoods"], 150 * 270).item()
    out = coder.compress(x_padded)
    real = bpp_from_strings(out["strings"], 150 * 270)
    assert torch.equal(out["y_hat"], y_hat) and abs(estimate / real - 1) < 0.15  # a random tiny model
    decoded = coder.decompress(out["strings"], out["shape"])
    assert torch.equal(decoded["y_hat"], y_hat)
    assert torch.equal(codec_io.crop_center(decoded["x_hat"], compressed.padding),
                       codec_io.decode(model, bitstream.unpack(data))[0])


def test_progress_reports_every_tile(model, image):
    calls = []
    codec_io.round_trip(model, image, 128, 32, lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)] * 2  # encode, then the check decode


def test_version_1_files_still_decode(model, image):
    """An untiled file in the version-1 layout (one-byte string count, no tile fields) decodes as before."""
    compressed, y_hat = codec_io.encode(model, image)
    old = bitstream.pack(compressed, version=1)
    assert old[4] == 1 and old[34] == 2 and len(old) == len(bitstream.pack(compressed)) - 7
    assert bitstream.unpack(old) == compressed
    assert torch.equal(codec_io.decode(model, bitstream.unpack(old))[1], y_hat)
    with pytest.raises(ValueError, match="version 1 holds no tiles"):
        bitstream.pack(CompressedImage(**{**compressed.__dict__, "tile": 64}), version=1)
    with pytest.raises(BitstreamError, match="format version 3 is not supported"):
        bitstream.unpack(old[:4] + b"\x03" + old[5:])


def test_every_truncation_of_a_tiled_file_is_refused(tiled):
    data = tiled[0]
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            bitstream.unpack(data[:n])
    for i in range(0, len(data), 7):
        damaged = bytearray(data)
        damaged[i] ^= 0x04
        with pytest.raises(BitstreamError):
            bitstream.unpack(bytes(damaged))


def _with_crc(data):
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


def test_bad_tile_fields_are_refused_even_with_a_valid_crc(model, tiled):
    data, compressed, _ = tiled
    for tile, overlap, message in ((100, 32, "tile side 100 is not a positive multiple of 64"),
                                   (128, 24, "tile overlap 24 is not a multiple of 16"),
                                   (64, 128, "between 0 and the tile side 64"),
                                   (0, 32, "overlap 32 without tiles")):
        damaged = _with_crc(data[:34] + struct.pack(">HH", tile, overlap) + data[38:])
        with pytest.raises(BitstreamError, match=message):
            bitstream.unpack(damaged)
    # A valid tile side that does not match the strings: 6 tiles of 128 hold 12 strings, 15 tiles of 64 need 30.
    damaged = bitstream.unpack(_with_crc(data[:34] + struct.pack(">HH", 64, 32) + data[38:]))
    with pytest.raises(BitstreamError, match="12 strings for 15 tile"):
        codec_io.decode(model, damaged)
    # A string count far beyond the file is refused from the header, before the lengths are read.
    huge = _with_crc(data[:38] + struct.pack(">I", bitstream.MAX_STRINGS) + data[42:])
    with pytest.raises(BitstreamError, match="truncated"):
        bitstream.unpack(huge)
    with pytest.raises(BitstreamError, match="strings announced"):
        bitstream.unpack(_with_crc(data[:38] + struct.pack(">I", bitstream.MAX_STRINGS + 1) + data[42:]))


def test_a_damaged_tile_stream_is_refused(model, tiled):
    data, compressed, _ = tiled
    strings = list(compressed.strings)
    strings[5] = bytes(len(strings[5]))  # the z string of the third tile
    damaged = CompressedImage(**{**compressed.__dict__, "strings": tuple(strings)})
    with pytest.raises(codec_io.CodecError, match="corrupt z stream"):
        codec_io.decode(model, bitstream.unpack(bitstream.pack(damaged)))


def test_plan_tiles_chooses_tiles_only_when_memory_is_short(model):
    size, padded = (3000, 4000), (3008, 4032)
    tile, overlap, estimate, note = codec_io.plan_tiles(model, size, padded, max_memory_gb=1000)
    assert (tile, overlap, note) == (0, 0, None)
    need = codec_io.estimate_peak_memory(model, padded, 512, 64) / 2**30
    tile, overlap, estimate, note = codec_io.plan_tiles(model, size, padded, max_memory_gb=need * 1.01)
    assert (tile, overlap) == (512, 64) and "coding it in 512x512 tiles" in note and "--tile 0" in note
    smaller = codec_io.plan_tiles(model, size, padded, max_memory_gb=need * 0.999)
    assert smaller[0] in (256, 128, 64)
    with pytest.raises(codec_io.CodecError, match=r"untiled \(--tile 0\).*allow tiles"):
        codec_io.plan_tiles(model, size, padded, 0, max_memory_gb=need)
    assert codec_io.plan_tiles(model, size, padded, 256, max_memory_gb=1000)[:2] == (256, 64)
    with pytest.raises(codec_io.CodecError, match="even in 64x64 tiles"):
        codec_io.plan_tiles(model, size, padded, max_memory_gb=0.01)


def _save_png(array, path):
    Image.fromarray(array).save(path)
    return path


def test_cli_tiled_round_trip_is_exact(checkpoint, tmp_path):
    source = _save_png(np.random.default_rng(3).integers(0, 256, (130, 200, 3), dtype=np.uint8), tmp_path / "in.png")
    encoded = run_codec("encode", source, tmp_path / "a.csm", "--checkpoint", checkpoint, "--tile", 64,
                        "--tile-overlap", 16, "--recon", tmp_path / "recon.png", "--dump-y-hat", tmp_path / "enc.npy",
                        "--threads", 1)
    assert encoded.returncode == 0, encoded.stderr
    assert "12 tiles of 64 (overlap 16)" in encoded.stdout and "Traceback" not in encoded.stderr
    assert "tiles" in encoded.stderr  # the progress bar over 12 tiles
    decoded = run_codec("decode", tmp_path / "a.csm", tmp_path / "out.png", "--checkpoint", checkpoint,
                        "--dump-y-hat", tmp_path / "dec.npy", "--threads", 1)
    assert decoded.returncode == 0, decoded.stderr
    assert np.load(tmp_path / "enc.npy").tobytes() == np.load(tmp_path / "dec.npy").tobytes()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(tmp_path / "recon.png")))
    # A truncated tiled file: one line, naming the file, nothing written.
    (tmp_path / "cut.csm").write_bytes((tmp_path / "a.csm").read_bytes()[:-10])
    result = run_codec("decode", tmp_path / "cut.csm", tmp_path / "cut.png", "--checkpoint", checkpoint)
    assert str(tmp_path / "cut.csm") in assert_one_line_error(result, "truncated")
    assert not (tmp_path / "cut.png").exists()


def test_cli_tiles_automatically_when_memory_is_short(checkpoint, model, tmp_path):
    source = _save_png(np.random.default_rng(4).integers(0, 256, (600, 700, 3), dtype=np.uint8), tmp_path / "in.png")
    untiled = codec_io.estimate_peak_memory(model, (640, 704)) / 2**30
    tiled = codec_io.estimate_peak_memory(model, (640, 704), 512, 64) / 2**30
    assert tiled < untiled
    limit = f"{(tiled + untiled) / 2:.4f}"
    result = run_codec("encode", source, tmp_path / "a.csm", "--checkpoint", checkpoint, "--max-memory-gb", limit,
                       "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert "coding it in 512x512 tiles" in result.stderr and "4 tiles of 512" in result.stdout
    assert bitstream.read_file(tmp_path / "a.csm").tile == 512
    refused = run_codec("encode", source, tmp_path / "b.csm", "--checkpoint", checkpoint, "--max-memory-gb", limit,
                        "--tile", 0)
    assert_one_line_error(refused, "untiled (--tile 0)", "allow tiles")
    for bad, message in ((["--tile", 100], "--tile must be 0 or a positive multiple of 64"),
                         (["--tile", 64, "--tile-overlap", 80], "--tile-overlap must be a multiple of 16 from 0"),
                         (["--tile", 0, "--tile-overlap", 16], "--tile-overlap needs tiles")):
        result = run_codec("encode", source, tmp_path / "c.csm", "--checkpoint", checkpoint, *bad)
        assert result.returncode == 2 and message in result.stderr


def test_eval_tiled_records_real_rates(checkpoint, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        _save_png(np.random.default_rng(i).integers(0, 256, (100, 140, 3), dtype=np.uint8), data / f"{i}.png")
    documents = {}
    for tile in (0, 64):
        out = tmp_path / f"tile{tile}.json"
        eval_main()(["--checkpoint", str(checkpoint), "--data", str(data), "--tile", str(tile), "--tile-overlap",
                     "32" if tile else "0", "-o", str(out), "--threads", "1"])
        documents[tile] = json.loads(out.read_text())
    assert '"tile": 64, "tile_overlap": 32' in json.dumps(documents[64]) and '"tile": 0' in json.dumps(documents[0])
    assert documents[64]["results"]["round_trip_failures"] == [0]
    assert documents[64]["results"]["bpp"][0] != documents[0]["results"]["bpp"][0]  # 6 tiles: other strings


MALLOC_PROBE = """
import ctypes, sys
sys.path.insert(0, {repo!r})
from utils.codec_io import map_large_buffers

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
applied = map_large_buffers() if sys.argv[1] == "apply" else False
libc.free(libc.malloc(8 << 20))  # a freed mapping raises glibc's own threshold to 8 MiB
mapped = libc.mallinfo2().hblkhd
block = libc.malloc(2 << 20)
print(applied, libc.mallinfo2().hblkhd - mapped)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
@pytest.mark.parametrize("mode", ["apply", "leave"])
def test_large_buffers_stay_mapped_after_map_large_buffers(mode):
    # Without the fixed threshold, a 2 MiB block after a freed 8 MiB one lands in the heap (and can fragment it);
    # with it, the block gets its own mapping, which free() returns to the system.
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE.format(repo=repo), mode], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    applied, grown = out[0] == "True", int(out[1])
    assert applied == (mode == "apply")
    assert (grown >= 2 << 20) == (mode == "apply")
