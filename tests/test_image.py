"""Tests of imgmw.image: loading every Pillow mode, atomic saving, colour spaces, sizes, layouts."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgmw.image as image_mod
from imgmw.image import (ImageError, from_colorspace, image_to_points, is_grey, load_image, parse_size,
                         points_to_image, resize, resize_max, save_image, side_by_side, stack_rows,
                         to_colorspace)

DATA = Path(__file__).resolve().parent.parent / "data"


def _rgb(values) -> torch.Tensor:
    """``[H, W, 3]`` uint8-like nested list → expected ``[3, H, W]`` float tensor."""
    return torch.tensor(np.asarray(values, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------ loading modes

def test_load_rgb_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (3, 5, 7) and img.dtype == torch.float32
    torch.testing.assert_close(img, _rgb(arr), rtol=0, atol=1e-7)


def test_load_grey_is_repeated_over_channels(tmp_path):
    arr = np.array([[0, 128, 255], [7, 64, 200]], dtype=np.uint8)
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    expected = torch.tensor(arr / 255.0, dtype=torch.float32)
    for c in range(3):
        torch.testing.assert_close(img[c], expected, rtol=0, atol=1e-7)


def test_load_bilevel(tmp_path):
    im = Image.new("1", (3, 2), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "b.png")
    img = load_image(tmp_path / "b.png")
    expected = torch.zeros(2, 3)
    expected[0, 1] = 1.0
    assert torch.equal(img[0], expected) and torch.equal(img[2], expected)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_load_alpha_composited_over_white(tmp_path, mode):
    grey, alphas = 40, (0, 255, 128)
    colour = (grey,) if mode == "LA" else (grey, grey, grey)
    im = Image.new(mode, (3, 1))
    for x, a in enumerate(alphas):
        im.putpixel((x, 0), colour + (a,))
    im.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    v = grey / 255.0
    for x, a in enumerate(alphas):
        alpha = a / 255.0
        expected = v * alpha + 1.0 * (1 - alpha)      # over white
        torch.testing.assert_close(img[:, 0, x], torch.full((3,), expected), rtol=0, atol=1e-6)


def test_load_rgba_colour_composite(tmp_path):
    im = Image.new("RGBA", (1, 1), (200, 10, 100, 64))
    im.save(tmp_path / "c.png")
    a = 64 / 255
    expected = torch.tensor([200, 10, 100]) / 255 * a + (1 - a)
    torch.testing.assert_close(load_image(tmp_path / "c.png")[:, 0, 0], expected.float(), rtol=0, atol=1e-6)


def test_load_palette_and_palette_transparency(tmp_path):
    palette = [255, 0, 0, 0, 128, 255, 10, 20, 30] + [0] * (256 * 3 - 9)
    im = Image.new("P", (3, 1))
    im.putpalette(palette)
    for x in range(3):
        im.putpixel((x, 0), x)
    im.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    torch.testing.assert_close(img[:, 0, :].T, torch.tensor([[255, 0, 0], [0, 128, 255], [10, 20, 30]]) / 255.0,
                               rtol=0, atol=1e-7)
    im.save(tmp_path / "pt.png", transparency=1)      # index 1 fully transparent → white
    img_t = load_image(tmp_path / "pt.png")
    assert torch.equal(img_t[:, 0, 1], torch.ones(3))
    torch.testing.assert_close(img_t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_load_cmyk(tmp_path):
    im = Image.new("CMYK", (3, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))        # no ink: white
    im.putpixel((1, 0), (0, 0, 0, 255))      # full black
    im.putpixel((2, 0), (255, 0, 0, 0))      # full cyan: (0, 1, 1)
    im.save(tmp_path / "c.tif")
    img = load_image(tmp_path / "c.tif")
    torch.testing.assert_close(img[:, 0, :].T, torch.tensor([[1.0, 1, 1], [0, 0, 0], [0, 1, 1]]))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_load_16bit(tmp_path, suffix):
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / f"d{suffix}")
    assert Image.open(tmp_path / f"d{suffix}").mode.startswith("I")
    img = load_image(tmp_path / f"d{suffix}")
    assert img[0, 0, 1] == 1.0 and img[0, 0, 0] == 0.0
    torch.testing.assert_close(img[1], torch.tensor(arr / 65535.0, dtype=torch.float32), rtol=0, atol=1e-7)


def test_load_mode_i_and_f(tmp_path):
    Image.fromarray(np.array([[0, 65535, 300]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    torch.testing.assert_close(load_image(tmp_path / "i.tif")[0, 0], torch.tensor([0, 1.0, 300 / 65535]))
    Image.fromarray(np.array([[-10, 0, 30]], dtype=np.int32), "I").save(tmp_path / "neg.tif")
    torch.testing.assert_close(load_image(tmp_path / "neg.tif")[0, 0], torch.tensor([0, 0.25, 1.0]))
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    torch.testing.assert_close(load_image(tmp_path / "f.tif")[2, 0], torch.tensor([0, 0.25, 1.0]))
    Image.fromarray(np.array([[2.0, 4.0, 6.0]], dtype=np.float32), "F").save(tmp_path / "f2.tif")
    torch.testing.assert_close(load_image(tmp_path / "f2.tif")[1, 0], torch.tensor([0, 0.5, 1.0]))


def test_load_exif_rotation(tmp_path):
    h, w = 2, 4
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    arr[1, 3] = (0, 255, 0)
    im = Image.fromarray(arr, "RGB")
    exif = im.getexif()
    exif[0x0112] = 6                         # orientation 6: display = stored rotated 90° clockwise
    im.save(tmp_path / "r.png", exif=exif)
    img = load_image(tmp_path / "r.png")
    assert img.shape == (3, w, h)
    # a clockwise quarter turn sends (r, c) to (c, h − 1 − r)
    assert torch.equal(img[:, 0, h - 1], torch.tensor([1.0, 0, 0]))
    assert torch.equal(img[:, 3, h - 1 - 1], torch.tensor([0, 1.0, 0]))
    assert img.sum() == 2.0


def test_load_sample_data_all_readable():
    files = sorted(p for p in DATA.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(files) >= 6
    for path in files:
        img = load_image(path)
        assert img.shape[0] == 3 and max(img.shape[1:]) <= 1024 and 0 <= img.min() and img.max() <= 1


# ---------------------------------------------------------------------------------------- loading errors

def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_load_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file") as err:
        load_image(tmp_path / "nope.png")
    _one_line_naming(err, tmp_path / "nope.png")


def test_load_directory(tmp_path):
    with pytest.raises(ImageError, match="directory") as err:
        load_image(tmp_path)
    _one_line_naming(err, tmp_path)


def test_load_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture\n")
    with pytest.raises(ImageError, match="not an image") as err:
        load_image(path)
    _one_line_naming(err, path)


def test_load_truncated_image(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as err:
        load_image(path)
    _one_line_naming(err, path)


def test_load_zero_size(tmp_path, monkeypatch):
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path = tmp_path / "zero.png"    # a PNG whose header says width 0 (Pillow refuses it on open)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ImageError) as err:
        load_image(path)
    _one_line_naming(err, path)
    # a decoder that does hand back an empty image is caught by the size check
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    monkeypatch.setattr(image_mod.ImageOps, "exif_transpose", lambda im: Image.new("RGB", (0, 3)))
    with pytest.raises(ImageError, match="zero size"):
        load_image(tmp_path / "ok.png")


# ------------------------------------------------------------------------------------------------ saving

def test_save_png_round_trip_exact(tmp_path):
    arr = torch.randint(0, 256, (3, 6, 5)).float() / 255
    out = save_image(arr, tmp_path / "x.png")
    assert out == tmp_path / "x.png"
    torch.testing.assert_close(load_image(out), arr, rtol=0, atol=1e-7)


def test_save_clamps_and_rounds(tmp_path):
    values = torch.tensor([[-0.5, 1.5, (10 + 0.4) / 255, (10 + 0.6) / 255]])
    save_image(values, tmp_path / "c.png")
    got = np.asarray(Image.open(tmp_path / "c.png"))
    assert got.tolist() == [[0, 255, 10, 11]]


@pytest.mark.parametrize("shape", [(1, 4, 3), (4, 3)])
def test_save_grey_shapes(tmp_path, shape):
    grey = torch.rand(shape, dtype=torch.float64)
    save_image(grey, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "L"
    expected = (grey.reshape(4, 3) * 255).round() / 255
    torch.testing.assert_close(load_image(tmp_path / "g.png"), expected.float().expand(3, 4, 3))


def test_save_jpeg_by_suffix(tmp_path):
    img = torch.full((3, 16, 16), 0.5)
    for name in ("a.jpg", "b.JPEG"):
        save_image(img, tmp_path / name)
        assert Image.open(tmp_path / name).format == "JPEG"
        assert (load_image(tmp_path / name) - 0.5).abs().max() < 2 / 255


def test_save_leaves_only_the_file_with_normal_permissions(tmp_path):
    save_image(torch.rand(3, 4, 4), tmp_path / "x.png")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_bad_suffix_and_directory(tmp_path):
    with pytest.raises(ValueError, match="unsupported image suffix") as err:
        save_image(torch.rand(3, 4, 4), tmp_path / "x.bmp")
    assert str(tmp_path / "x.bmp") in str(err.value)
    with pytest.raises(ValueError, match="cannot write") as err:
        save_image(torch.rand(3, 4, 4), tmp_path / "missing" / "x.png")
    assert str(tmp_path / "missing" / "x.png") in str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write"):
        save_image(torch.rand(3, 4, 4), tmp_path / "file" / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_save_bad_tensors(tmp_path):
    with pytest.raises(ValueError, match="float"):
        save_image(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        save_image(torch.full((3, 4, 4), float("nan")), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        save_image(torch.rand(2, 4, 4), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(28, "No space left on device")])
def test_save_is_atomic_when_the_writer_fails(tmp_path, monkeypatch, error):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous content")

    def failing_save(self, fp, format=None, **kwargs):
        fp.write(b"\x89PNG partial data")       # something was written before the failure
        raise error

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises((RuntimeError, ValueError)) as err:
        save_image(torch.rand(3, 8, 8), target)
    if isinstance(error, OSError):
        assert isinstance(err.value, ImageError) and str(target) in str(err.value)
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]       # temp file removed


def test_save_failure_leaves_no_new_file(tmp_path, monkeypatch):
    def failing_save(self, fp, format=None, **kwargs):
        fp.write(b"partial")
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(RuntimeError):
        save_image(torch.rand(3, 8, 8), tmp_path / "new.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ colour spaces

def test_lab_known_values_and_round_trip():
    white_red = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64).reshape(3, 1, 2)
    lab = to_colorspace(white_red, "lab")
    torch.testing.assert_close(lab[:, 0, 0], torch.tensor([100.0, 0, 0], dtype=torch.float64), atol=0.01, rtol=0)
    # sRGB red in CIE Lab (D65): L 53.24, a 80.09, b 67.20
    torch.testing.assert_close(lab[:, 0, 1], torch.tensor([53.24, 80.09, 67.20], dtype=torch.float64),
                               atol=0.02, rtol=0)
    img = torch.rand(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_colorspace(to_colorspace(img, "lab"), "lab"), img, atol=1e-6, rtol=0)


def test_linear_and_rgb_spaces():
    img = torch.tensor([0.0, 0.5, 1.0, 0.02], dtype=torch.float64).reshape(1, 4, 1).expand(3, 4, 1)
    lin = to_colorspace(img, "linear")
    srgb_decode = torch.tensor([0.0, ((0.5 + 0.055) / 1.055) ** 2.4, 1.0, 0.02 / 12.92], dtype=torch.float64)
    torch.testing.assert_close(lin[0, :, 0], srgb_decode)
    torch.testing.assert_close(from_colorspace(lin, "linear"), img)
    assert to_colorspace(img, "rgb") is img


def test_colorspace_errors_and_gradient():
    with pytest.raises(ValueError, match="space"):
        to_colorspace(torch.rand(3, 2, 2), "hsv")
    with pytest.raises(ValueError, match=r"\[\*, 3, H, W\]"):
        to_colorspace(torch.rand(4, 2, 2), "lab")
    x = (0.1 + 0.8 * torch.rand(1, 3, 2, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: to_colorspace(t, "lab"), (x,))


def test_points_round_trip_and_order():
    img = torch.rand(2, 3, 4, 5)
    pts = image_to_points(img)
    assert pts.shape == (2, 20, 3)
    assert torch.equal(pts[1, 2 * 5 + 3], img[1, :, 2, 3])
    assert torch.equal(points_to_image(pts, 4, 5), img)
    assert torch.equal(image_to_points(img[0]), pts[0])
    with pytest.raises(ValueError, match="H·W"):
        points_to_image(pts, 5, 5)


# ------------------------------------------------------------------------------------------------- sizes

def test_resize_max():
    img = torch.rand(3, 300, 450)
    small = resize_max(img, 100)
    assert small.shape == (3, 67, 100)
    assert resize_max(img, 450) is img
    assert resize_max(torch.rand(2, 3, 40, 20), 10).shape == (2, 3, 10, 5)
    flat = torch.full((3, 50, 80), 0.3)
    torch.testing.assert_close(resize_max(flat, 16), torch.full((3, 10, 16), 0.3))
    with pytest.raises(ValueError, match="max_side"):
        resize_max(img, 0)


@pytest.mark.parametrize("text, expected", [("512", (512, 512)), ("640x360", (360, 640)), (" 64X32 ", (32, 64)),
                                            (256, (256, 256)), ("1x16384", (16384, 1))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "16385", "abc", "10x", "x10", "1x2x3", "", "3.5", "640x0", "²"])
def test_parse_size_errors(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_side_by_side():
    a = torch.rand(3, 20, 30)
    b = torch.rand(1, 10, 10)
    c = torch.rand(40, 20)
    out = side_by_side([a, b, c], pad=2)
    h = 40
    widths = [round(30 * h / 20), h, 20]
    assert out.shape == (3, h + 4, sum(widths) + 4 * 2)
    assert torch.equal(out[:, :2], torch.ones(3, 2, out.shape[2]))            # white border
    assert torch.equal(out[:, 2:2 + h, :2], torch.ones(3, h, 2))
    torch.testing.assert_close(out[:, 2:2 + h, out.shape[2] - 2 - 20:out.shape[2] - 2], c.expand(3, -1, -1))
    same = side_by_side([a], height=20, pad=0)
    assert torch.equal(same, a)
    with pytest.raises(ValueError, match="non-empty"):
        side_by_side([])


def test_resize_to_exact_size():
    img = torch.rand(3, 40, 60, dtype=torch.float64)
    out = resize(img, (17, 31))
    assert out.shape == (3, 17, 31)
    assert resize(img, (40, 60)) is img
    # antialiased: a constant image stays constant, a checkerboard averages to its mean at half size
    assert torch.allclose(resize(torch.full((1, 8, 8), 0.3), (3, 5)), torch.full((1, 3, 5), 0.3))
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).double()
    assert torch.allclose(resize(board[None], (4, 4)), torch.full((1, 4, 4), 0.5, dtype=torch.float64), atol=0.05)
    assert resize(torch.rand(2, 3, 9, 9), (4, 5)).shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="size"):
        resize(img, (0, 4))
    with pytest.raises(ValueError, match="img"):
        resize(torch.rand(9, 9), (4, 4))


def test_stack_rows_pads_narrow_rows_white():
    a, b = torch.zeros(3, 2, 5), torch.zeros(1, 3, 2)
    out = stack_rows([a, b])
    assert out.shape == (3, 5, 5)
    assert (out[:, :2] == 0).all() and (out[:, 2:, :2] == 0).all()
    assert (out[:, 2:, 2:] == 1).all()
    with pytest.raises(ValueError, match="rows"):
        stack_rows([])


def test_is_grey():
    g = torch.rand(1, 9, 7, generator=torch.Generator().manual_seed(0))
    assert is_grey(g.expand(3, -1, -1)) and is_grey(g.expand(3, -1, -1).unsqueeze(0))
    tinted = g.repeat(3, 1, 1)
    tinted[1, 4, 2] += 1 / 255
    assert not is_grey(tinted)
    with pytest.raises(ValueError, match="expected an image"):
        is_grey(torch.zeros(1, 8, 8))
