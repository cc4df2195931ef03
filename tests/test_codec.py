"""The codec: file format checks, every odd input, exact file round trips, refusals, cross-process determinism.

CLI tests run ``python codec.py`` in a subprocess and check the exit status and the one-line ``error:`` on stderr.
Models are tiny random ``csm-small`` variants: the reconstructions are poor, but every check here is exact.
"""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from models import build_model, save_checkpoint
from utils import bitstream, bundled, codec_io
from tests.helpers import torch_threads
from utils.bitstream import BitstreamError, CompressedImage

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"
TINY = dict(N=8, M=40, Z=16, context_dim=16, cc_hidden=(16, 16), num_slices=2)
CPU_SCAN = None  # "cpu" when the compiled scan builds here, else "torch" (set by the `scan_backends` fixture)


# --- helpers and fixtures -------------------------------------------------------------------------------------
def run_codec(*args, timeout=600):
    """``python codec.py ARGS`` from the repository root: the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "codec.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result, *fragments):
    """Exit status 1 and one ``error:`` line naming the problem, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert not any(line.startswith("error") for line in lines[:-1])
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process coding on one thread (``torch_threads``)."""
    with torch_threads(1):
        yield


def tiny_model(seed):
    torch.manual_seed(seed)
    model = build_model("csm-small", **TINY)
    model.update(force=True)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny models that differ only in their random weights."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return tuple(save_checkpoint(folder / f"tiny{seed}.pth.tar", tiny_model(seed)) for seed in (0, 1))


@pytest.fixture(scope="module")
def model(checkpoints):
    return codec_io.load_model(checkpoints[0])[0]


@pytest.fixture(scope="module")
def scan_backends():
    """(encoder's, decoder's) scan backends: the compiled CPU scan and the PyTorch one where both exist."""
    from layers.scan import resolve_backend

    return resolve_backend("cpu", "auto"), "torch"


def save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def random_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_header_only(path, width, height):
    """A PNG whose header says width x height and whose pixel data is a stub: only its size can be read."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def coded(model, tmp_path_factory):
    """A coded 40x24 image: (file bytes, CompressedImage, y_hat)."""
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    compressed, y_hat = codec_io.encode(model, x)
    return bitstream.pack(compressed), compressed, y_hat


# --- the file format ------------------------------------------------------------------------------------------
def test_pack_unpack_round_trip_and_layout(coded):
    data, compressed, _ = coded
    assert bitstream.unpack(data) == compressed
    assert data[:4] == b"\x89CSM" and data[4] == bitstream.VERSION and data[5] == codec_io.DETERMINISTIC_MODE
    assert struct.unpack(">HH", data[22:26]) == (24, 40)
    assert tuple(data[26:30]) == compressed.padding == (12, 12, 20, 20)
    assert struct.unpack(">HHHHI", data[30:42]) == (1, 1, 0, 0, 2)  # z shape, no tiles, 2 strings
    y_len, z_len = struct.unpack(">II", data[42:50])
    assert data[50 : 50 + y_len] == compressed.strings[0] and len(data) == 50 + y_len + z_len + 4
    assert struct.unpack(">I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_every_truncation_and_every_bit_flip_is_refused(coded):
    data = coded[0]
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            bitstream.unpack(data[:n])
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            with pytest.raises(BitstreamError):
                bitstream.unpack(bytes(damaged))
    with pytest.raises(BitstreamError, match="extended"):
        bitstream.unpack(data + b"\0")


def test_values_the_format_cannot_hold_are_refused():
    base = CompressedImage(1, bytes(16), (64, 64), (0, 0, 0, 0), (1, 1), (b"y" * 8, b"z" * 8))
    for bad in (
        dict(size=(65536, 1)),
        dict(size=(0, 5)),
        dict(model_id=bytes(15)),
        dict(strings=()),
    ):
        with pytest.raises(ValueError):
            bitstream.pack(CompressedImage(**{**base.__dict__, **bad}))
    assert bitstream.unpack(bitstream.pack(base)) == base


@pytest.mark.parametrize(
    "size, padding, z_shape",
    [((63, 65), (31, 32, 0, 1), (1, 3)), ((63, 65), (32, 31, 0, 1), (1, 2)), ((64, 64), (0, 0, 0, 0), (2, 1))],
)
def test_inconsistent_geometry_is_refused(size, padding, z_shape):
    CompressedImage(1, bytes(16), (63, 65), (31, 32, 0, 1), (1, 2), (b"y", b"z")).check_geometry(64)  # pad_center's
    image = CompressedImage(1, bytes(16), size, padding, z_shape, (b"y" * 8, b"z" * 8))
    with pytest.raises(BitstreamError, match="inconsistent header"):
        image.check_geometry(64)


# --- the model id and the memory estimate ---------------------------------------------------------------------
def test_model_id_names_config_and_weights(model, checkpoints):
    first = codec_io.model_id(model)
    assert len(first) == 16 and codec_io.model_id(model) == first
    assert codec_io.model_id(codec_io.load_model(checkpoints[0])[0]) == first  # a fresh load: same id
    assert codec_io.model_id(codec_io.load_model(checkpoints[1])[0]) != first
    other = tiny_model(0)
    with torch.no_grad():
        other.g_s[-1][0].bias[0] += 1e-6  # one weight, one ulp or so: another model
    assert codec_io.model_id(other) != codec_io.model_id(tiny_model(0))


def test_the_bundled_model_keeps_its_id():
    """Files written with the bundled checkpoint before config fields were added must still name it: the id
    leaves out later fields at their defaults, and counts them when they differ."""
    bundled_model = codec_io.load_model(codec.DEFAULT_CHECKPOINT)[0]
    # The bundled model since 2026-12-08 (the study's csm at lambda 0.013, 3000 steps; checkpoints/README.md). A
    # retrained bundle changes the id on purpose: files of an older bundle (aa8bace8..., ce608d9c...) name another
    # model and are refused.
    assert codec_io.model_id(bundled_model).hex() == "29a6264979daeb34638be9c64bfc8833"
    assert "cnn_depth" not in bundled_model.config.identity_dict()
    lighter = build_model("csm-small", cnn_depth=2)
    assert lighter.config.identity_dict()["cnn_depth"] == 2


def test_every_bundled_quality_is_there_with_the_id_it_records():
    """decode finds the checkpoint of a file by the ids in utils/bundled.py: they must be the files' own."""
    assert bundled.DEFAULT_QUALITY in bundled.BUNDLED and codec.DEFAULT_CHECKPOINT == bundled.by_quality(2)
    lambdas = [bundled.BUNDLED[q].lmbda for q in bundled.QUALITIES]
    assert lambdas == sorted(lambdas)  # a higher quality is a higher rate
    for quality, entry in bundled.BUNDLED.items():
        assert entry.quality == quality
        assert codec_io.model_id(codec_io.load_model(bundled.by_quality(quality))[0]).hex() == entry.model_id
        assert bundled.by_model_id(bytes.fromhex(entry.model_id)) == quality


def test_memory_estimate_grows_with_the_image_and_refuses(model):
    small = codec_io.estimate_peak_memory(model, (64, 64))
    large = codec_io.estimate_peak_memory(model, (4096, 4096))
    assert small < large
    assert codec_io.check_memory(model, (60, 60), (64, 64)) == small  # fits this machine
    with pytest.raises(codec_io.CodecError, match=r"needs about .* GB at peak untiled, over the limit of 0\.0 GB "
                       r"\(--max-memory-gb\)"):
        codec_io.check_memory(model, (60, 60), (64, 64), max_memory_gb=0.001)
    tiled = codec_io.estimate_peak_memory(model, (4096, 4096), tile=512, overlap=64)
    assert tiled < large and tiled > codec_io.estimate_peak_memory(model, (640, 640))


# --- inputs ---------------------------------------------------------------------------------------------------
def _gray(path):
    return save(Image.fromarray(np.arange(30 * 20, dtype=np.uint8).reshape(20, 30), "L"), path / "gray.png")


def _rgba(path):
    img = random_rgb(20, 30).convert("RGBA")
    img.putalpha(128)
    return save(img, path / "rgba.png")


def _palette(path):
    return save(random_rgb(20, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), path / "palette.png")


def _png16(path):
    values = (np.arange(30 * 20 * 3, dtype=np.uint32).reshape(20, 30, 3) * 97 % 65536).astype(">u2")
    # Pillow cannot write 16-bit RGB PNGs; this writes one by hand (filter 0 on every row).
    raw = b"".join(b"\0" + row.tobytes() for row in values)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 30, 20, 16, 2, 0, 0, 0)
    (path / "rgb16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path / "rgb16.png"


def _cmyk(path):
    return save(random_rgb(20, 30).convert("CMYK"), path / "cmyk.jpg", quality=95)


def _exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return save(random_rgb(20, 30), path / "rotated.jpg", exif=exif, quality=95)


def _one_pixel(path):
    return save(Image.new("RGB", (1, 1), (200, 100, 50)), path / "one.png")


def _odd(path):
    return save(random_rgb(63, 65), path / "odd.png")


def _thin(path):
    return save(random_rgb(1, 130), path / "thin.png")


@pytest.mark.parametrize(
    "make, size, note",
    [
        (_gray, (20, 30), "grayscale (L) replicated to RGB"),
        (_rgba, (20, 30), "alpha of RGBA dropped"),
        (_palette, (20, 30), "palette (P) expanded to RGB"),
        (_png16, (20, 30), "16-bit PNG (RGB) scaled to 8 bits"),
        (_cmyk, (20, 30), "CMYK converted to RGB"),
        (_exif_rotated, (30, 20), "EXIF orientation 6 applied"),
        (_one_pixel, (1, 1), None),
        (_odd, (63, 65), None),
        (_thin, (1, 130), None),
    ],
)
def test_every_kind_of_input_codes_and_crops_back(model, tmp_path, make, size, note):
    x, got_note, tiling, _ = codec_io.read_image(make(tmp_path), model)
    assert tiling == (0, 0)  # small enough: untiled
    assert tuple(x.shape) == (1, 3, *size)
    assert got_note == note or note in got_note
    if make is _gray:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    compressed, y_hat = codec_io.encode(model, x)
    assert compressed.size == size and all(p < 64 for p in compressed.padding)
    compressed.check_geometry(64)
    x_hat, y_hat_decoded = codec_io.decode(model, bitstream.unpack(bitstream.pack(compressed)))
    assert tuple(x_hat.shape) == (1, 3, *size)
    assert torch.equal(y_hat_decoded, y_hat)


def test_unreadable_inputs_are_refused(model, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "cut.png").write_bytes(_odd(tmp_path).read_bytes()[:200])
    for name, message in (("empty.png", "empty file"), ("text.png", "not an image"), ("missing.png", "no such"),
                          ("cut.png", "truncated")):
        with pytest.raises(codec_io.CodecError, match=message):
            codec_io.read_image(tmp_path / name, model)
    with pytest.raises(codec_io.CodecError, match="holds sides up to 65535"):
        codec_io.read_image(png_header_only(tmp_path / "wide.png", 70000, 1), model)


# --- decoding what is not quite our file ----------------------------------------------------------------------
def _with_crc(data):
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


def test_damaged_streams_with_a_valid_crc_are_refused(model, coded):
    data, compressed, _ = coded
    y_len = len(compressed.strings[0])
    for offset, what in ((50 + 9, "corrupt y stream"), (50 + y_len + 5, "corrupt z stream")):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        with pytest.raises(codec_io.CodecError, match=what):
            codec_io.decode(model, bitstream.unpack(_with_crc(bytes(damaged))))
    for field, value, message in ((5, 9, "coding mode 9 is unknown"), (8, 0xFF, "encoded with model"),
                                  (27, 33, "inconsistent header")):
        damaged = bytearray(data)
        damaged[field] = value
        with pytest.raises((codec_io.CodecError, BitstreamError), match=message):
            codec_io.decode(model, bitstream.unpack(_with_crc(bytes(damaged))))


def test_cli_refuses_damaged_files_in_one_line(coded, checkpoints, tmp_path):
    data = coded[0]
    cases = {
        "empty": (b"", "empty file"),
        "text": (b"just some text\n", "not a CSM compressed image"),
        "magic": (b"\x89CSX" + data[4:], "not a CSM compressed image"),
        "version": (data[:4] + b"\x07" + data[5:], "format version 7 is not supported"),
        "cut3": (data[:3], "truncated"),
        "cut20": (data[:20], "truncated"),
        "cut40": (data[:40], "truncated"),
        "cut_strings": (data[: len(data) // 2], "truncated"),
        "cut_crc": (data[:-1], "truncated"),
    }
    for name, (offset, bit) in {"flip_header": (23, 0), "flip_strings": (60, 3), "flip_crc": (len(data) - 2, 7)}.items():
        damaged = bytearray(data)
        damaged[offset] ^= 1 << bit
        cases[name] = (bytes(damaged), "CRC-32 mismatch")
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.csm"
        path.write_bytes(content)
        line = assert_one_line_error(run_codec("decode", path, tmp_path / "out.png", "--checkpoint", checkpoints[0]),
                                     message)
        assert str(path) in line
    assert not (tmp_path / "out.png").exists()


def test_cli_refuses_another_models_file(coded, checkpoints, tmp_path):
    path = tmp_path / "a.csm"
    path.write_bytes(coded[0])
    result = run_codec("decode", path, tmp_path / "out.png", "--checkpoint", checkpoints[1], "--threads", 1)
    assert_one_line_error(result, "encoded with model", "decode with the checkpoint that encoded it")
    assert not (tmp_path / "out.png").exists()


def test_cli_refuses_a_compressai_architecture(tmp_path):
    path = save_checkpoint(tmp_path / "mbt.pth.tar", build_model("compressai:mbt2018-mean", N=8, M=16))
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    result = run_codec("encode", tmp_path / "in.png", tmp_path / "out.csm", "--checkpoint", path, "--threads", 1)
    assert_one_line_error(result, "holds compressai:mbt2018-mean", "CSM models only", "eval.py")
    assert not (tmp_path / "out.csm").exists()


def test_missing_bundled_checkpoint_says_what_to_do(coded, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundled, "FOLDER", tmp_path / "nowhere")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert codec.main(["encode", str(tmp_path / "in.png"), str(tmp_path / "out.csm")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the bundled checkpoint of quality 2") and "train.py" in err and "\n" not in err
    assert not (tmp_path / "out.csm").exists()
    # A file of a model that is not bundled: decoding without --checkpoint says to pass the one that encoded it.
    path = tmp_path / "a.csm"
    path.write_bytes(coded[0])
    assert codec.main(["decode", str(path), str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the file was encoded with model {coded[1].model_id.hex()}, none of the bundled")
    assert "--checkpoint" in err and "\n" not in err


def test_quality_picks_a_bundled_checkpoint_and_decode_finds_the_one_that_encoded(checkpoints, tmp_path,
                                                                                  monkeypatch, capsys):
    """Two tiny models stand in as qualities 1 and 2: --quality 1 encodes with the first; the decoder, given no
    option, decodes with it (the file names its model id); --quality 2 is the wrong model and is refused."""
    table = {q: bundled.Bundled(q, path.name, 0.01 * q, codec_io.model_id(codec_io.load_model(path)[0]).hex())
             for q, path in zip((1, 2), checkpoints)}
    monkeypatch.setattr(bundled, "FOLDER", checkpoints[0].parent)
    monkeypatch.setattr(bundled, "BUNDLED", table)
    monkeypatch.setattr(bundled, "QUALITIES", (1, 2))
    save(random_rgb(24, 40, seed=2), tmp_path / "in.png")
    coded = {}
    for quality in (1, 2):
        path = tmp_path / f"q{quality}.csm"
        assert codec.main(["encode", str(tmp_path / "in.png"), str(path), "--quality", str(quality),
                           "--recon", str(tmp_path / f"q{quality}_recon.png")]) == 0
        coded[quality] = path.read_bytes()
    assert coded[1] != coded[2]
    assert codec.main(["encode", str(tmp_path / "in.png"), str(tmp_path / "default.csm")]) == 0
    assert (tmp_path / "default.csm").read_bytes() == coded[2]  # the default quality
    capsys.readouterr()
    for quality in (1, 2):
        assert codec.main(["decode", str(tmp_path / f"q{quality}.csm"), str(tmp_path / "out.png")]) == 0
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")),
                              np.asarray(Image.open(tmp_path / f"q{quality}_recon.png")))
    assert codec.main(["decode", str(tmp_path / "q1.csm"), str(tmp_path / "wrong.png"), "--quality", "2"]) == 1
    assert "decode with the checkpoint that encoded it" in capsys.readouterr().err
    assert not (tmp_path / "wrong.png").exists()


def test_quality_and_checkpoint_are_exclusive_and_qualities_are_checked(checkpoints, tmp_path):
    result = run_codec("decode", tmp_path / "a.csm", tmp_path / "b.png", "--quality", bundled.DEFAULT_QUALITY,
                       "--checkpoint", checkpoints[0])
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    result = run_codec("encode", tmp_path / "a.png", tmp_path / "b.csm", "--quality", max(bundled.QUALITIES) + 1)
    assert result.returncode == 2 and "invalid choice" in result.stderr


# --- the command line end to end ------------------------------------------------------------------------------
def test_cli_round_trip_is_exact(checkpoints, tmp_path):
    """An odd-sized RGBA image: encode (with its note), decode; the PNG equals the encoder's reconstruction."""
    img = random_rgb(63, 65, seed=5).convert("RGBA")
    source = save(img, tmp_path / "in.png")
    encoded = run_codec("encode", source, tmp_path / "a.csm", "--checkpoint", checkpoints[0],
                        "--recon", tmp_path / "recon.png", "--dump-y-hat", tmp_path / "enc.npy", "--threads", 1)
    assert encoded.returncode == 0, encoded.stderr
    assert "note: " in encoded.stderr and "alpha of RGBA dropped" in encoded.stderr
    assert "Traceback" not in encoded.stderr and "Warning" not in encoded.stderr
    assert "65x63" in encoded.stdout and "bpp" in encoded.stdout and "PSNR" in encoded.stdout
    decoded = run_codec("decode", tmp_path / "a.csm", tmp_path / "out.png", "--checkpoint", checkpoints[0],
                        "--dump-y-hat", tmp_path / "dec.npy", "--threads", 1)
    assert decoded.returncode == 0, decoded.stderr
    assert "error" not in decoded.stderr and "Traceback" not in decoded.stderr
    out, recon = Image.open(tmp_path / "out.png"), Image.open(tmp_path / "recon.png")
    assert out.size == (65, 63) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(recon))
    assert np.load(tmp_path / "enc.npy").tobytes() == np.load(tmp_path / "dec.npy").tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csm", "dec.npy", "enc.npy", "in.png", "out.png",
                                                          "recon.png"]  # no temporary files left


def test_cli_refuses_an_image_too_large_for_memory(checkpoints, tmp_path):
    """60000 x 60000 (a header-only PNG): refused from its header, before any pixel is decoded."""
    source = png_header_only(tmp_path / "huge.png", 60000, 60000)
    result = run_codec("encode", source, tmp_path / "huge.csm", "--checkpoint", checkpoints[0], "--threads", 1)
    assert_one_line_error(result, "image 60000x60000 (padded 60032x60032) needs about", "even in 64x64 tiles",
                          "over the limit of", "--max-memory-gb")
    assert not (tmp_path / "huge.csm").exists()


# --- determinism across processes, thread counts and scan backends -------------------------------------------
def _codec_process(threads, jobs):
    """One fresh Python process running ``codec.main`` on each job (list of args) with ``threads`` threads."""
    code = "import sys, codec\nfor args in {jobs!r}:\n    assert codec.main(args + ['--threads', '{threads}']) == 0\n"
    result = subprocess.run([sys.executable, "-c", code.format(jobs=jobs, threads=threads)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.skipif(not (KODAK / "kodim04.png").exists(), reason="Kodak images not available")
def test_decoded_latents_are_identical_across_processes_threads_and_backends(checkpoints, scan_backends, tmp_path):
    """Encode 4 Kodak crops with 2 threads (compiled CPU scan), two of them in tiles, decode in a fresh process with
    1 thread and the PyTorch scan: y_hat is identical bit for bit; the pictures agree to within one 8-bit level."""
    encoder_backend, decoder_backend = scan_backends
    names = [f"kodim0{i}" for i in range(1, 5)]
    encode_jobs, decode_jobs = [], []
    for name in names:
        Image.open(KODAK / f"{name}.png").convert("RGB").crop((128, 64, 384, 320)).save(tmp_path / f"{name}.png")
        encode_jobs.append(["encode", str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}.csm"), "--checkpoint",
                            str(checkpoints[0]), "--scan-backend", encoder_backend, "--recon",
                            str(tmp_path / f"{name}.recon.png"), "--dump-y-hat", str(tmp_path / f"{name}.enc.npy"),
                            *(["--tile", "128", "--tile-overlap", "32"] if name in names[2:] else [])])
        decode_jobs.append(["decode", str(tmp_path / f"{name}.csm"), str(tmp_path / f"{name}.out.png"),
                            "--checkpoint", str(checkpoints[0]), "--scan-backend", decoder_backend,
                            "--dump-y-hat", str(tmp_path / f"{name}.dec.npy")])
    _codec_process(2, encode_jobs)
    _codec_process(1, decode_jobs)
    for name in names:
        encoded, decoded = np.load(tmp_path / f"{name}.enc.npy"), np.load(tmp_path / f"{name}.dec.npy")
        assert encoded.shape == (1, TINY["M"], 16, 16)
        assert encoded.tobytes() == decoded.tobytes(), name
        recon = np.asarray(Image.open(tmp_path / f"{name}.recon.png"), dtype=np.int16)
        out = np.asarray(Image.open(tmp_path / f"{name}.out.png"), dtype=np.int16)
        assert np.abs(recon - out).max() <= 1, name


def test_default_float32_path_is_not_portable_but_deterministic_mode_is(model):
    """Why the mode exists: the float32 entropy parameters differ between scan backends, the float64 ones do not."""
    from layers.scan import resolve_backend

    if resolve_backend("cpu", "auto") != "cpu":
        pytest.skip("the compiled CPU scan is not available")
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    bottleneck = model.entropy_bottleneck
    with torch.no_grad():
        z_hat = bottleneck.decompress(bottleneck.compress(model.h_a(model.g_a(x))), (2, 2))
        results = {}
        for deterministic in (False, True):
            model.deterministic = deterministic
            for backend in ("cpu", "torch"):
                model.scan_backend = backend
                h_mean_s, h_scale_s, entropy_model, cast = model._coding_path()
                means, scales = h_mean_s(cast(z_hat)), h_scale_s(cast(z_hat))
                results[deterministic, backend] = entropy_model.slice_params(0, means, scales, [])[0]
    model.deterministic, model.scan_backend = True, "auto"
    assert not torch.equal(results[False, "cpu"], results[False, "torch"])
    assert torch.equal(results[True, "cpu"], results[True, "torch"])
    assert results[True, "cpu"].dtype == torch.float64
    assert torch.equal(results[True, "cpu"], torch.round(results[True, "cpu"] * 256) / 256)
