"""Image files: every pixel mode to RGB in [0, 1], EXIF orientation, clear errors for bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.errors import DataError
from unclip.images import detail_map, fit_square, load_image, save_png, to_uint8

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def test_rgb_jpeg_of_any_size_reads_as_chw_in_unit_range(tmp_path):
    path = tmp_path / "wide.jpg"
    _halves(90, 30).save(path, quality=95)
    image = load_image(path)
    assert image.shape == (3, 30, 90) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image[:, 15, 10].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.05)
    assert image[:, 15, 80].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=0.05)
    for side in (1, 3):
        Image.new("RGB", (side, side), RED).save(tmp_path / f"{side}.png")
        assert load_image(tmp_path / f"{side}.png").shape == (3, side, side)


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    _halves(40, 20).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (3, 40, 20)  # upright: taller than wide
    assert image[:, 5, 10].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.05)  # the left half is now on top
    assert image[:, 35, 10].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=0.05)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # invisible red
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image[:, 0, 0].tolist() == pytest.approx([1, 0, 0])
    assert image[:, 0, 1].tolist() == pytest.approx([1, 1, 1])
    assert image[:, 0, 2].tolist() == pytest.approx([127 / 255] * 3, abs=1e-6)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[:, 0, 1].tolist() == pytest.approx([1, 1, 1])


def test_palette_greyscale_bilevel_and_cmyk_become_rgb(tmp_path):
    palette = _halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.gif", transparency=int(np.asarray(palette)[0, 0]))  # red marked transparent
    gif = load_image(tmp_path / "p.gif")
    assert gif[:, 10, 5].tolist() == pytest.approx([1, 1, 1])  # transparent -> white
    assert gif[:, 10, 35].tolist() == pytest.approx([0, 0, 1], abs=0.02)
    Image.new("L", (5, 7), 51).save(tmp_path / "l.png")
    grey = load_image(tmp_path / "l.png")
    assert grey.shape == (3, 7, 5) and torch.allclose(grey, torch.full_like(grey, 0.2))
    Image.new("1", (6, 6), 1).save(tmp_path / "bits.png")
    assert torch.equal(load_image(tmp_path / "bits.png"), torch.ones(3, 6, 6))
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg")[:, 3, 3].tolist() == pytest.approx([1, 0, 0], abs=0.05)


def _png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_images_keep_their_range(tmp_path):
    grey = np.array([[0, 1000, 1100, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    assert image[0, 0].tolist() == pytest.approx((grey[0] / 65535).tolist(), abs=1e-6)
    assert image[0, 0, 1] < image[0, 0, 2]  # two levels 8 bits would merge stay apart
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    assert torch.allclose(load_image(tmp_path / "g16.tif"), image)
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 32768
    _png16_rgb(tmp_path / "rgb16.png", rgb)
    assert load_image(tmp_path / "rgb16.png")[:, 1, 2].tolist() == pytest.approx([1, 0, 0.5], abs=0.01)
    Image.fromarray(np.array([[0.25, 2.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif")[0, 0].tolist() == pytest.approx([0.25, 1.0])


@pytest.mark.parametrize("kind", ["text", "empty", "truncated_png", "truncated_jpeg", "missing"])
def test_bad_files_raise_a_data_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.png"
    if kind == "text":
        path.write_text("this is not an image")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind.startswith("truncated"):
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        fmt = "PNG" if kind.endswith("png") else "JPEG"
        Image.fromarray(noise).save(path, format=fmt)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=f"bad_{kind}"):
        load_image(path)


def test_fit_square_crops_the_centre_and_png_round_trips(tmp_path):
    image = torch.zeros(3, 20, 40)
    image[:, :, 10:30] = 1.0  # a white centre square between black side bands
    square = fit_square(image, 20)
    assert square.shape == (3, 20, 20) and torch.equal(square, torch.ones(3, 20, 20))
    assert fit_square(torch.rand(2, 3, 30, 50), 16).shape == (2, 3, 16, 16)
    small = fit_square(torch.rand(3, 5, 5), 64)
    assert small.shape == (3, 64, 64) and small.min() >= 0 and small.max() <= 1
    picture = torch.rand(3, 8, 8)
    save_png(picture, tmp_path / "out" / "x.png")
    back = load_image(tmp_path / "out" / "x.png")
    assert torch.equal(back, torch.from_numpy(to_uint8(picture)).permute(2, 0, 1).float() / 255)


def test_real_photographs_and_files_from_scikit_image():
    data = pytest.importorskip("skimage.data")
    folder = Path(data.__file__).parent
    names = [
        "astronaut.png",
        "camera.png",
        "logo.png",
        "rocket.jpg",
        "horse.png",
        "no_time_for_that_tiny.gif",
    ]
    for name in names:
        image = load_image(folder / name)
        assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1, name
        assert fit_square(image, 64).shape == (3, 64, 64)


def test_detail_map_marks_pixels_next_to_an_edge_in_batches_of_any_shape():
    images = torch.zeros(2, 3, 3, 8, 8)
    images[0, 1, 2, :, 4:] = 1.0  # a vertical edge in one channel of one image
    detail = detail_map(images, 0.5)
    assert detail.shape == (2, 3, 8, 8) and detail.dtype == torch.bool
    assert detail[0, 1, :, 3:5].all() and detail.sum() == 16  # the columns either side of the edge
    assert torch.equal(detail_map(images[0, 1], 0.5), detail[0, 1])
    assert not detail_map(images, 1.0).any()  # a spread of exactly the threshold is not detail
