"""utils/image.py: every input format converted to the same 8-bit RGB, exact padding and PNG round trips."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from utils.image import (ImageReadError, atomic_write, crop_center, list_images, load_image, load_image_with_note,
                         pad_center, save_image, to_uint8)


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """1x3xHxW tensor in [0, 1] -> HxWx3 uint8 array, for exact comparisons with Pillow's pixels."""
    return to_uint8(x)[0].permute(1, 2, 0).numpy()


def write_png16(path, samples: np.ndarray) -> None:
    """Write an HxWx3 or HxWx4 uint16 array as a 16-bit RGB or RGBA PNG (Pillow cannot write one)."""
    height, width, channels = samples.shape
    rows = b"".join(b"\x00" + samples[i].astype(">u2").tobytes() for i in range(height))  # filter type 0 rows

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = {3: 2, 4: 6}[channels]  # PNG colour types RGB and RGBA
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_rgb_png_loads_exactly_without_note(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "rgb.png")
    x, note = load_image_with_note(tmp_path / "rgb.png")
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    assert note is None
    np.testing.assert_array_equal(as_uint8(x), pixels)


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    x, note = load_image_with_note(tmp_path / "gray.png")
    np.testing.assert_array_equal(as_uint8(x), np.repeat(gray[..., None], 3, axis=2))
    assert "grayscale" in note


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x, note = load_image_with_note(tmp_path / "rgba.png")
    np.testing.assert_array_equal(as_uint8(x), rgba[..., :3])  # over white, the first pixel would be 255s
    assert "alpha" in note and "RGBA" in note


def test_gray_alpha_is_dropped(tmp_path):
    Image.fromarray(np.array([[[70, 0], [140, 255]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    x, _ = load_image_with_note(tmp_path / "la.png")
    np.testing.assert_array_equal(as_uint8(x), [[[70] * 3, [140] * 3]])


def test_palette_is_expanded(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([2, 0, 1])
    img.save(tmp_path / "palette.png")
    x, note = load_image_with_note(tmp_path / "palette.png")
    np.testing.assert_array_equal(as_uint8(x), [[[0, 0, 255], [255, 0, 0], [0, 255, 0]]])
    assert "palette" in note


def test_16bit_grayscale_png_is_rounded_from_v_over_257(tmp_path):
    values = np.array([[0, 257, 65535, 1000, 128, 129, 33000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    x, note = load_image_with_note(tmp_path / "gray16.png")
    expected = np.array([0, 1, 255, 4, 0, 1, 128], dtype=np.uint8)  # 1000/257 = 3.89, 128/257 = 0.498
    np.testing.assert_array_equal(as_uint8(x)[0], np.repeat(expected[:, None], 3, axis=1))
    assert "round(v/257)" in note


def test_16bit_rgb_png_is_rounded_from_v_over_257(tmp_path):
    samples = np.array([[[900, 1000, 65535], [0, 384, 257 * 200]]], dtype=np.uint16)
    write_png16(tmp_path / "rgb16.png", samples)
    x, note = load_image_with_note(tmp_path / "rgb16.png")
    # Pillow alone keeps the high byte (900 -> 3, 384 -> 1); round(v/257) gives 4 and 1 (384/257 = 1.49).
    np.testing.assert_array_equal(as_uint8(x), [[[4, 4, 255], [0, 1, 200]]])
    assert "16-bit" in note


def test_16bit_rgba_png_drops_alpha_and_rounds(tmp_path):
    samples = np.array([[[900, 65535, 0, 0], [384, 257, 65535, 30000]]], dtype=np.uint16)
    write_png16(tmp_path / "rgba16.png", samples)
    x, note = load_image_with_note(tmp_path / "rgba16.png")
    np.testing.assert_array_equal(as_uint8(x), [[[4, 255, 0], [1, 1, 255]]])
    assert "alpha dropped" in note


def test_cmyk_jpeg_matches_pillows_conversion(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    x, note = load_image_with_note(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as decoded:
        assert decoded.mode == "CMYK"
        np.testing.assert_array_equal(as_uint8(x), np.asarray(decoded.convert("RGB")))
    assert np.abs(as_uint8(x).astype(int) - [255, 0, 0]).max() <= 3
    assert "CMYK" in note


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high: red left half, blue right half
    pixels[:, :16, 0] = 255
    pixels[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored as is; to be shown rotated 90 degrees clockwise
    Image.fromarray(pixels, "RGB").save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    x, note = load_image_with_note(tmp_path / "rotated.jpg")
    assert x.shape == (1, 3, 32, 16)  # transposed: 16 wide, 32 high
    top, bottom = as_uint8(x)[:16].astype(float).mean((0, 1)), as_uint8(x)[16:].astype(float).mean((0, 1))
    assert top[0] > 200 and top[2] < 50  # clockwise rotation puts the left (red) half on top
    assert bottom[2] > 200 and bottom[0] < 50
    with Image.open(tmp_path / "rotated.jpg") as img:
        np.testing.assert_array_equal(as_uint8(x), np.asarray(ImageOps.exif_transpose(img).convert("RGB")))
    assert "EXIF orientation 6" in note


def test_non_image_file_raises_image_read_error_naming_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_image(path)
    assert issubclass(ImageReadError, ValueError)


def test_truncated_png_raises_image_read_error(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 7).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png")


def test_list_images_filters_and_sorts(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "e.tif", "f.bmp", "readme.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JPEG", "d.webp", "e.tif", "f.bmp"]


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        list_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")


def test_save_image_round_trip_is_exact_and_leaves_no_temp_file(tmp_path):
    x = torch.randint(0, 256, (1, 3, 9, 11)).float() / 255
    path = tmp_path / "out" / "x.png"
    save_image(x, path)
    save_image(x.flip(-1), path)  # overwrite in place
    assert torch.equal(load_image(path), x.flip(-1))
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_write_gives_a_plain_file_s_permissions(tmp_path):
    import os

    mask = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "out.png") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600


def test_large_tensors_round_to_uint8_in_blocks_with_the_same_values():
    x = torch.rand(1, 3, 1100, 1400, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    assert x.numel() > 1 << 22
    assert torch.equal(to_uint8(x), (x.clamp(0, 1) * 255).round().to(torch.uint8))


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-0.1, 0.0, 1 / 255, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.2])
    y = to_uint8(x)
    assert y.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 0, 1, 128, 255, 255]  # 0.5 * 255 = 127.5 rounds half to even


@pytest.mark.parametrize("height,width,multiple", [(1, 1, 64), (63, 65, 64), (64, 64, 64), (17, 30, 16)])
def test_pad_center_then_crop_center_is_exact(height, width, multiple):
    x = torch.rand(2, 3, height, width) + 0.1  # nonzero, so the zero padding is visible
    padded, padding = pad_center(x, multiple)
    left, right, top, bottom = padding
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert padded.shape[-2:] == (height + top + bottom, width + left + right)
    assert padded.shape[-2] - height < multiple and padded.shape[-1] - width < multiple
    assert 0 <= right - left <= 1 and 0 <= bottom - top <= 1
    assert torch.equal(padded[..., top:top + height, left:left + width], x)
    outside = padded.clone()
    outside[..., top:top + height, left:left + width] = 0
    assert not outside.any()
    assert torch.equal(crop_center(padded, padding), x)


def test_pad_center_values_for_odd_sizes():
    assert pad_center(torch.zeros(1, 3, 63, 65), 64)[1] == (31, 32, 0, 1)
    assert pad_center(torch.zeros(1, 3, 1, 1), 64)[1] == (31, 32, 31, 32)
    assert pad_center(torch.zeros(1, 3, 64, 128), 64)[1] == (0, 0, 0, 0)
