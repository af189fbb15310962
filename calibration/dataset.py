"""Datasets on disk in MVTec AD layout, read into RGB uint8 arrays (decoding: calibration.images).

    <root>/train/good/*                      normal images (fit on these)
    <root>/test/<type>/*                     test images, type "good" is normal
    <root>/ground_truth/<type>/<stem>_mask.png   defect masks (0 normal, >0 defect)
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import cv2
import numpy as np

from calibration import images
from engines.errors import LineguardError

if TYPE_CHECKING:
    from calibration.geometry import Geometer, Layout

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(LineguardError):
    """A dataset folder or image that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One test image. rel: its path relative to test/ (e.g. "crack/000.png"); label 1 = defective."""

    path: Path
    rel: str
    label: int
    mask_path: Path | None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def train_images(root: str | Path) -> list[Path]:
    """Sorted image paths of <root>/train/good."""
    folder = Path(root) / "train" / "good"
    if not folder.is_dir():
        inside = sorted(d.name for d in Path(root).iterdir() if (d / "train" / "good").is_dir()) \
            if Path(root).is_dir() else []
        more = " ..." if len(inside) > 4 else ""
        hint = (f"; the datasets inside it: {', '.join(str(Path(root) / n) for n in inside[:4])}{more}: give one "
                "or more of them" if inside else "")
        raise DataError(f"{folder} not found; a dataset folder needs train/good/ with normal images "
                        "(MVTec AD layout: <dataset>/train/good, <dataset>/test/<type>, <dataset>/ground_truth/<type>)"
                        + hint)
    paths = _images_in(folder)
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the normal images there")
    return paths


def evaluation_samples(root: str | Path) -> list[Sample]:
    """Every image under <root>/test/<type>/, with its mask path for defect types."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{test} not found; evaluation needs test/good/ and test/<defect type>/ folders")
    samples = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir()):
        good = folder.name == "good"
        stems: dict[str, Path] = {}
        for path in _images_in(folder):
            if path.stem in stems:  # one mask name, one --maps / --scores file for both
                raise DataError(f"{stems[path.stem]} and {path} share the name {path.stem!r}, so their mask and "
                                "output files would be the same; rename one")
            stems[path.stem] = path
            mask = None
            if not good:
                mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"mask {mask} for defective image {path} not found; give every defective "
                                    "test image a ground_truth/<type>/<stem>_mask.png (only test/good holds normal "
                                    f"images: test/{folder.name} is read as a defect type)")
            samples.append(Sample(path, f"{folder.name}/{path.name}", 0 if good else 1, mask))
    if not samples:
        raise DataError(f"{test} holds no images; put test images in test/good/ and test/<defect type>/")
    return samples


def _file_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check the path and permissions") from None


def read_image(path: Path, bits: int = 16) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a file (a 16-bit one scaled by `bits` significant bits); DataError naming
    the file if it cannot be read."""
    data = _file_bytes(path)
    try:
        return images.decode(data, str(path), bits=bits)
    except images.ImageError as exc:
        raise DataError(str(exc)) from None


def sample_bits(paths: Sequence[Path], sample: int = 32) -> int:
    """The significant bits of the 16-bit images among `paths` (evenly spread, at most `sample` of them
    decoded): from their largest sample value; 16 where none is 16-bit."""
    picks = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int))]
    high = -1
    for path in picks:
        data = _file_bytes(path)
        depth = images.png_bit_depth(data)
        if images.is_jpeg(data) or (depth is not None and depth <= 8):  # 8-bit, from the header: no decoding
            continue
        pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if pixels is not None and pixels.dtype == np.uint16:
            high = max(high, int(pixels.max()))
    return images.significant_bits(high) if high >= 0 else 16


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header where it has one (png, jpeg), else by decoding it."""
    encoding = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(path.suffix.lower())
    if encoding:
        with open(path, "rb") as f:
            size = images.file_size(memoryview(f.read()), encoding)
        if size is not None:
            return size
    return read_image(path).shape[:2]


def read_frame(path: Path, geometer: "Geometer") -> tuple["Layout", np.ndarray]:
    """A file as a model takes it: (its layout, from the frame's own size, and uint8 RGB pixels [H, W, 3]
    decoded for that layout: a large JPEG at the reduced scale `geometer.decode_shrink` gives, as the
    inference workers decode it). DataError naming the file if it cannot be read."""
    data = _file_bytes(path)
    try:
        if not images.is_jpeg(data):
            image = images.decode(data, str(path), bits=geometer.geometry.bits)
            return geometer.layout(image.shape[:2]), image
        size = images.file_size(memoryview(data), "jpeg")
        if size is None:
            raise images.ImageError(f"{path}: no JPEG frame header; the file is damaged, replace or remove it")
        layout = geometer.layout(size)
        return layout, images.decode(data, str(path), geometer.decode_shrink(layout))
    except images.ImageError as exc:
        raise DataError(str(exc)) from None


def _prefetched(read, paths: Sequence[Path], prefetch: int) -> Iterator:
    """read(path) of each of `paths` in order, run on a background thread `prefetch` ahead."""
    with ThreadPoolExecutor(1) as pool:
        pending = [pool.submit(read, p) for p in paths[:prefetch]]
        for i in range(len(paths)):
            item = pending[i].result()
            pending[i] = None
            if i + prefetch < len(paths):
                pending.append(pool.submit(read, paths[i + prefetch]))
            yield item


def read_images(paths: Sequence[Path], prefetch: int = 4, bits: int = 16) -> Iterator[np.ndarray]:
    """uint8 RGB images of `paths` in order, whole (16-bit ones scaled by `bits`), decoded on a background
    thread `prefetch` ahead."""
    return _prefetched(lambda p: read_image(p, bits), paths, prefetch)


def read_frames(paths: Sequence[Path], geometer: "Geometer", prefetch: int = 4) -> Iterator[tuple["Layout", np.ndarray]]:
    """`read_frame` of each of `paths` in order, on a background thread `prefetch` ahead: what fit, eval
    and int8 calibration feed a model."""
    return _prefetched(lambda p: read_frame(p, geometer), paths, prefetch)


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """bool [H, W] defect mask (all False for None); DataError if missing or of another size."""
    if path is None:
        return np.zeros(shape, bool)
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # as stored: a 16-bit mask's 1s and labels kept
    if mask is None:
        raise DataError(f"{path}: mask not readable; masks are PNGs, 0 normal and nonzero defect")
    if mask.ndim == 3:
        mask = mask[:, :, :3].max(axis=2)  # a colour mask: any colour is defect
    if mask.shape != shape:
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}; "
                        "masks must match their images' size")
    return mask > 0
