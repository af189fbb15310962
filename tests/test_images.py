"""Pixel conversion and decoding in one place (calibration/images.py): every reader's path to uint8 RGB."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calibration import images
from calibration.images import ImageError


def _noise(shape, seed=0, dtype=np.uint8, hi=None):
    hi = hi or (256 if dtype == np.uint8 else 65536)
    return np.random.default_rng(seed).integers(0, hi, shape).astype(dtype)


def _encode(ext: str, array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, array)
    assert ok
    return data.tobytes()


def test_decode_png_rgb_grey_rgba_and_16_bit():
    rgb = _noise((6, 7, 3))
    np.testing.assert_array_equal(images.decode(_encode(".png", rgb[:, :, ::-1].copy())), rgb)
    grey = _noise((5, 4))
    np.testing.assert_array_equal(images.decode(_encode(".png", grey)), np.repeat(grey[:, :, None], 3, 2))
    bgra = _noise((4, 4, 4))
    np.testing.assert_array_equal(images.decode(_encode(".png", bgra)), bgra[:, :, [2, 1, 0]])
    deep = _noise((3, 5), dtype=np.uint16)
    np.testing.assert_array_equal(images.decode(_encode(".png", deep))[:, :, 0], (deep >> 8).astype(np.uint8))


@pytest.mark.parametrize("data", [b"", b"not an image at all", bytes(range(256)) * 4])
def test_decode_garbage_names_the_image(data):
    with pytest.raises(ImageError, match="in-memory.png"):
        images.decode(data, "in-memory.png")


def test_to_rgb_orders_and_bit_depths():
    rgb = _noise((3, 4, 3))
    assert images.to_rgb(rgb) is rgb  # nothing to do: no copy
    np.testing.assert_array_equal(images.to_rgb(rgb[:, :, ::-1].copy(), order="BGR"), rgb)
    twelve = _noise((4, 4), dtype=np.uint16, hi=4096)
    got = images.to_rgb(twelve, bits=12)
    np.testing.assert_array_equal(got[:, :, 1], (twelve >> 4).astype(np.uint8))
    assert images.to_rgb(np.full((2, 2), 4095, np.uint16), bits=12).max() == 255  # full scale, not nearly black
    assert images.to_rgb(np.full((2, 2), 4095, np.uint16)).max() == 15  # read as 16-bit: what the old path did
    with pytest.raises(ImageError, match="float32"):
        images.to_rgb(np.zeros((2, 2), np.float32))
    with pytest.raises(ImageError, match="bits"):
        images.to_rgb(np.zeros((2, 2), np.uint16), bits=7)
    with pytest.raises(ImageError, match="shape"):
        images.to_rgb(np.zeros((2, 2, 2), np.uint8))


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """A Bayer mosaic of rgb: pattern names the colours of row 0, columns 0 and 1 (GenICam naming)."""
    index = {"R": 0, "G": 1, "B": 2}
    first = [index[c] for c in pattern]
    second = {"RG": "GB", "BG": "GR", "GR": "BG", "GB": "RG"}[pattern]
    rows = [first, [index[c] for c in second]]
    out = np.zeros(rgb.shape[:2], rgb.dtype)
    for dy in range(2):
        for dx in range(2):
            out[dy::2, dx::2] = rgb[dy::2, dx::2, rows[dy][dx]]
    return out


@pytest.mark.parametrize("pattern", ["RG", "BG", "GR", "GB"])
def test_bayer_patterns_demosaic_to_the_right_colours(pattern):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    got = images.to_rgb(_mosaic(rgb, pattern), bayer=pattern)
    np.testing.assert_array_equal(got[4:12, 4:12], rgb[4:12, 4:12])  # interior: exact for a flat colour


def test_pixel_formats_from_camera_buffers():
    mono12 = np.full((4, 6), 4095, np.dtype("<u2"))
    assert images.from_pixel_format(mono12.tobytes(), 4, 6, "Mono12").max() == 255
    bgr = _noise((4, 6, 3))
    np.testing.assert_array_equal(images.from_pixel_format(bgr, 4, 6, "BGR8"), bgr[:, :, ::-1])
    mosaic = _mosaic(np.full((8, 8, 3), (10, 220, 90), np.uint8), "RG")
    assert tuple(images.from_pixel_format(mosaic, 8, 8, "BayerRG8")[4, 4]) == (10, 220, 90)
    with pytest.raises(ImageError, match="Mono14p"):
        images.from_pixel_format(b"", 1, 1, "Mono14p")
    with pytest.raises(ImageError, match="samples"):
        images.from_pixel_format(np.zeros(10, np.uint8), 4, 6, "Mono8")


@pytest.mark.parametrize("shape, out", [((64, 64), (64, 64)), ((100, 80), (48, 96)), ((30, 200), (64, 32))])
def test_resize_shapes_constant_colour_and_in_place(shape, out):
    image = np.empty(shape + (3,), np.uint8)
    image[:] = (10, 200, 77)
    got = images.resize(image, *out)
    assert got.shape == out + (3,) and np.all(got == (10, 200, 77))
    buffer = np.zeros((2,) + out + (3,), np.uint8)
    images.resize(image, *out, out=buffer[1])
    assert np.all(buffer[1] == (10, 200, 77)) and not buffer[0].any()


def test_file_size_png_and_jpeg_headers():
    png = _encode(".png", _noise((13, 21, 3)))
    jpg = _encode(".jpg", _noise((8, 30, 3)))
    assert images.file_size(memoryview(png), "png") == (13, 21)
    assert images.file_size(memoryview(jpg), "jpeg") == (8, 30)
    assert images.file_size(memoryview(png[:40]), "png") is None  # a png cut short is not whole
    assert images.file_size(memoryview(b"\xff\xd8\xff\xd9"), "jpeg") is None


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (37, 53), (512, 512)])
def test_png_gray_is_lossless_for_opencv_and_pillow(shape):
    from io import BytesIO

    from PIL import Image

    smooth = cv2.GaussianBlur(_noise(shape, seed=1), (0, 0), 4) if min(shape) > 8 else _noise(shape, seed=1)
    for image in (_noise(shape), smooth, np.full(shape, 255, np.uint8)):
        data = images.png_gray(image)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), image)
        with Image.open(BytesIO(data)) as decoded:  # a second, independent decoder
            decoded.load()
            assert decoded.mode == "L"
            np.testing.assert_array_equal(np.asarray(decoded), image)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 1), np.uint8), np.zeros((0, 4), np.uint8)])
def test_png_gray_refuses_what_is_not_an_8_bit_grey_image(bad):
    with pytest.raises(ValueError, match="uint8"):
        images.png_gray(bad)


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 BGR [h, w, 3]: blurred noise, a photograph's spectrum more than white noise's."""
    return cv2.GaussianBlur(_noise((h, w, 3), seed), (0, 0), 3)


@pytest.mark.parametrize("shrink", [2, 4, 8])
@pytest.mark.parametrize("size", [(96, 128), (101, 75)])
def test_jpeg_decodes_at_a_reduced_scale_close_to_the_whole_image_resized(size, shrink):
    bgr = _smooth(*size)
    jpeg = _encode(".jpg", bgr)
    small = images.decode(jpeg, shrink=shrink)
    assert small.shape == (*images.shrunk(size, shrink), 3)
    assert images.shrunk(size, shrink) == (-(-size[0] // shrink), -(-size[1] // shrink))
    whole = images.decode(jpeg)
    area = cv2.resize(whole, small.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - area).mean() < 3  # the scaled inverse DCT is a low-pass, like the area filter
    # RGB order, like the whole decode: the channel means agree
    np.testing.assert_allclose(small.reshape(-1, 3).mean(0), whole.reshape(-1, 3).mean(0), atol=2)


def test_reduced_scale_applies_to_jpeg_only():
    rgb = _noise((40, 48, 3))
    png = _encode(".png", rgb[:, :, ::-1].copy())
    np.testing.assert_array_equal(images.decode(png, shrink=4), rgb)  # a png comes whole, as it is stored
    grey_jpeg = _encode(".jpg", _smooth(64, 64)[:, :, 0].copy())
    got = images.decode(grey_jpeg, shrink=2)
    assert got.shape == (32, 32, 3) and (got[:, :, 0] == got[:, :, 1]).all()
    with pytest.raises(ValueError, match="1/3"):
        images.decode(grey_jpeg, shrink=3)


def test_grey_stays_grey_when_asked():
    grey = _noise((6, 7))
    assert images.to_rgb(grey, keep_grey=True).shape == (6, 7, 1)
    np.testing.assert_array_equal(images.to_rgb(grey[:, :, None], keep_grey=True)[:, :, 0], grey)
    assert images.to_rgb(_noise((6, 7, 3)), keep_grey=True).shape == (6, 7, 3)  # colour is unchanged
    mono = images.from_pixel_format(grey.tobytes(), 6, 7, "Mono8", keep_grey=True)
    np.testing.assert_array_equal(mono, grey[:, :, None])
    np.testing.assert_array_equal(images.decode(_encode(".png", grey), keep_grey=True), grey[:, :, None])
    grey_jpeg = _encode(".jpg", _smooth(64, 48)[:, :, 0].copy())
    assert images.decode(grey_jpeg, shrink=2, keep_grey=True).shape == (32, 24, 1)


def test_file_shape_says_grey_or_colour_from_the_header():
    grey, colour = _noise((5, 6)), _noise((5, 6, 3))
    assert images.file_shape(memoryview(_encode(".png", grey)), "png") == (5, 6, 1)
    assert images.file_shape(memoryview(_encode(".png", _noise((5, 6, 4)))), "png") == (5, 6, 3)  # alpha dropped
    assert images.file_shape(memoryview(_encode(".jpg", grey)), "jpeg") == (5, 6, 1)
    assert images.file_shape(memoryview(_encode(".jpg", colour)), "jpeg") == (5, 6, 3)
    assert images.file_shape(memoryview(b"\xff\xd8 cut short"), "jpeg") is None
    assert images.file_shape(memoryview(b"not a png"), "png") is None
