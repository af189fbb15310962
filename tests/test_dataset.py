"""Reading MVTec-layout datasets and images (calibration/dataset.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.dataset import (
    DataError,
    evaluation_samples,
    image_size,
    read_frame,
    read_frames,
    read_image,
    read_images,
    read_mask,
    train_images,
)
from calibration.geometry import Geometer, Geometry, InputSpec
from engines.errors import LineguardError


def _write(path: Path, array: np.ndarray) -> Path:
    """Write an array exactly as cv2 takes it (BGR / BGRA channel order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return path


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    return _write(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _noise(h: int, w: int, c: int | None = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    hi = 256 if dtype == np.uint8 else 65536
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, hi, shape).astype(dtype)


# ----------------------------------------------------------------------------- reading files (decoding: tests/test_images.py)


def test_rgb_png_round_trip(tmp_path):
    rgb = _noise(20, 30)
    got = read_image(_write_rgb(tmp_path / "x.png", rgb))
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3)
    np.testing.assert_array_equal(got, rgb)


def test_bgr_to_rgb_order(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[:, :, 2] = 255  # pure red in cv2's BGR order
    got = read_image(_write(tmp_path / "red.png", red))
    assert np.all(got[:, :, 0] == 255) and np.all(got[:, :, 1:] == 0)


def test_grey_png_repeated_to_three_channels(tmp_path):
    grey = _noise(12, 16, None)
    got = read_image(_write(tmp_path / "grey.png", grey))
    assert got.shape == (12, 16, 3) and got.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], grey)


def test_rgba_png_drops_alpha(tmp_path):
    bgra = _noise(10, 10, 4)
    got = read_image(_write(tmp_path / "rgba.png", bgra))
    assert got.shape == (10, 10, 3)
    np.testing.assert_array_equal(got, bgra[:, :, [2, 1, 0]])  # alpha dropped, not blended


def test_16bit_png_scaled_to_8bit(tmp_path):
    bgr16 = _noise(9, 11, 3, dtype=np.uint16)
    got = read_image(_write(tmp_path / "deep.png", bgr16))
    assert got.dtype == np.uint8 and got.shape == (9, 11, 3)
    np.testing.assert_array_equal(got, (bgr16 >> 8).astype(np.uint8)[:, :, ::-1])
    grey16 = _noise(9, 11, None, dtype=np.uint16)
    got = read_image(_write(tmp_path / "deep_grey.png", grey16))
    np.testing.assert_array_equal(got, np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2))


def test_corrupt_file_names_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, LineguardError)


def test_empty_file_names_path(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "gone.png"
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- dataset layout


def test_train_images_missing_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as err:
        train_images(tmp_path)
    assert "train/good" in str(err.value)


def test_train_images_empty_folder(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        train_images(tmp_path)
    assert str(tmp_path / "train" / "good") in str(err.value)


def test_train_images_lists_only_images_sorted(tmp_path):
    good = tmp_path / "train" / "good"
    img = _noise(4, 4)
    for name in ("b.png", "a.JPG", "d.bmp", "c.jpeg", "e.tiff"):
        _write(good / name, img)
    (good / "readme.txt").write_text("x")
    (good / "f.png.bak").write_text("x")
    (good / "sub.png").mkdir()  # a folder with an image suffix is not an image
    _write(good / "sub.png" / "inner.png", img)
    got = train_images(str(tmp_path))
    assert [p.name for p in got] == ["a.JPG", "b.png", "c.jpeg", "d.bmp", "e.tiff"]
    assert all(isinstance(p, Path) and p.parent == good for p in got)


def _mvtec(root: Path) -> Path:
    img = _noise(16, 16)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    for rel in ("test/good/000.png", "test/good/001.png", "test/crack/000.png", "test/crack/001.png",
                "test/scratch/000.png"):
        _write_rgb(root / rel, img)
    for rel in ("ground_truth/crack/000_mask.png", "ground_truth/crack/001_mask.png",
                "ground_truth/scratch/000_mask.png"):
        _write(root / rel, mask)
    return root


def test_evaluation_samples_labels_rel_and_masks(tmp_path):
    root = _mvtec(tmp_path)
    samples = evaluation_samples(root)
    assert [s.rel for s in samples] == ["crack/000.png", "crack/001.png", "good/000.png", "good/001.png",
                                        "scratch/000.png"]
    assert [s.label for s in samples] == [1, 1, 0, 0, 1]
    by_rel = {s.rel: s for s in samples}
    assert by_rel["crack/001.png"].path == root / "test" / "crack" / "001.png"
    assert by_rel["crack/001.png"].mask_path == root / "ground_truth" / "crack" / "001_mask.png"
    assert by_rel["scratch/000.png"].mask_path == root / "ground_truth" / "scratch" / "000_mask.png"
    assert by_rel["good/000.png"].mask_path is None
    for s in samples:
        if s.mask_path is not None:
            assert s.mask_path.is_file()


def test_evaluation_samples_missing_mask_names_it(tmp_path):
    root = _mvtec(tmp_path)
    missing = root / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DataError) as err:
        evaluation_samples(root)
    assert str(missing) in str(err.value)


def test_evaluation_samples_name_what_a_real_test_set_gets_wrong(tmp_path):
    """A folder of normal images not named good (test/OK) is a defect type without masks: the error
    says only test/good holds normal images. Two images of one stem (000.png, 000.jpg) would share a
    mask and their --maps / --scores files: refused, naming both."""
    root = _mvtec(tmp_path / "ok")
    _write_rgb(root / "test" / "OK" / "000.png", _noise(16, 16))
    with pytest.raises(DataError, match="only test/good holds normal images: test/OK is read as a defect type"):
        evaluation_samples(root)
    root = _mvtec(tmp_path / "stems")
    _write_rgb(root / "test" / "good" / "000.jpg", _noise(16, 16))
    with pytest.raises(DataError, match="share the name '000'") as err:
        evaluation_samples(root)
    assert "000.jpg" in str(err.value) and "000.png" in str(err.value)


def test_evaluation_samples_missing_test_folder(tmp_path):
    with pytest.raises(DataError, match="test"):
        evaluation_samples(tmp_path)


# ----------------------------------------------------------------------------- masks, resizing, batches


def test_read_mask(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:9] = 255
    mask[0, 0] = 1  # any non-zero value is defect
    path = _write(tmp_path / "m.png", mask)
    got = read_mask(path, (10, 12))
    assert got.dtype == bool and got.shape == (10, 12)
    np.testing.assert_array_equal(got, mask > 0)
    none = read_mask(None, (3, 4))
    assert none.dtype == bool and none.shape == (3, 4) and not none.any()


def test_read_mask_keeps_16_bit_and_colour_masks(tmp_path):
    """A 16-bit mask of 0 / 1 (or of instance labels) and a colour mask: every nonzero pixel is defect
    (read as 8-bit grey, the 16-bit one came out all normal, and its defects counted as normal pixels)."""
    labels = np.zeros((10, 12), np.uint16)
    labels[2:5, 3:9] = 1
    labels[7, 1] = 300
    np.testing.assert_array_equal(read_mask(_write(tmp_path / "m16.png", labels), (10, 12)), labels > 0)
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[1:3, 1:3, 2] = 200  # red, in OpenCV's channel order
    np.testing.assert_array_equal(read_mask(_write(tmp_path / "rgb.png", colour), (10, 12)), colour.max(axis=2) > 0)


def test_read_mask_wrong_size(tmp_path):
    path = _write(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError) as err:
        read_mask(path, (12, 10))
    assert str(path) in str(err.value)


def test_read_mask_missing(tmp_path):
    with pytest.raises(DataError):
        read_mask(tmp_path / "missing_mask.png", (4, 4))


def test_read_images_in_order_with_prefetch(tmp_path):
    shapes = [(64, 64), (80, 100), (40, 30), (64, 128), (200, 64), (9, 9)]
    paths = [_write_rgb(tmp_path / f"{i:03d}.png", _noise(*shape, seed=i)) for i, shape in enumerate(shapes)]
    got = list(read_images(paths, prefetch=2))
    assert [g.shape[:2] for g in got] == shapes
    for path, image in zip(paths, got):
        np.testing.assert_array_equal(image, read_image(path))
    assert list(read_images([])) == []


def test_read_images_names_the_bad_file(tmp_path):
    good = _write_rgb(tmp_path / "ok.png", _noise(8, 8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        list(read_images([good, good, bad]))


def test_image_size_from_headers_and_by_decoding(tmp_path):
    png = _write_rgb(tmp_path / "a.png", _noise(23, 41))
    jpg = _write_rgb(tmp_path / "b.jpg", _noise(17, 5))
    bmp = _write_rgb(tmp_path / "c.bmp", _noise(6, 9))
    assert image_size(png) == (23, 41) and image_size(jpg) == (17, 5) and image_size(bmp) == (6, 9)


def test_read_frame_decodes_a_large_jpeg_for_its_layout(tmp_path):
    geometer = Geometer(InputSpec(64, 64), Geometry(), stride=8)
    big = cv2.GaussianBlur(_noise(300, 260), (0, 0), 2)
    jpg = _write(tmp_path / "big.jpg", big)
    layout, pixels = read_frame(jpg, geometer)
    assert layout.frame == (300, 260)  # maps, regions and masks stay in frame pixels
    assert geometer.decode_shrink(layout) == 4 and pixels.shape == (75, 65, 3)
    from calibration import images

    np.testing.assert_array_equal(pixels, images.decode(np.fromfile(jpg, np.uint8), shrink=4))
    full_layout, whole = read_frame(jpg, Geometer(InputSpec(64, 64), Geometry(jpeg_decode="full"), stride=8))
    assert full_layout.frame == (300, 260) and whole.shape == (300, 260, 3)
    png = _write_rgb(tmp_path / "big.png", big)
    layout, pixels = read_frame(png, geometer)  # other formats come whole
    assert layout.frame == (300, 260) and pixels.shape == (300, 260, 3)
    assert [l.frame for l, _ in read_frames([jpg, png], geometer, prefetch=1)] == [(300, 260)] * 2


def test_read_frame_names_a_jpeg_without_a_frame_header(tmp_path):
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(b"\xff\xd8 and nothing else")
    with pytest.raises(DataError, match="cut.jpg.*replace or remove"):
        read_frame(bad, Geometer(InputSpec(64, 64), Geometry(), stride=8))


def test_a_folder_of_datasets_given_for_one_names_them(tmp_path):
    """MVTec AD itself, or a folder of categories, given where one dataset is expected: the error names them."""
    from calibration.dataset import train_images

    for name in ("bottle", "cable"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="the datasets inside it: .*bottle, .*cable: give one or more of them"):
        train_images(tmp_path)
