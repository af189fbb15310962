"""Images on disk in MVTec AD layout, read into RGB uint8 arrays.

    <root>/train/good/*                      normal images (fit on these)
    <root>/test/<type>/*                     test images, type "good" is normal
    <root>/ground_truth/<type>/<stem>_mask.png   defect masks (0 normal, >0 defect)
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from engines.errors import LineguardError

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
        raise DataError(f"{folder} not found; a dataset folder needs train/good/ with normal images "
                        "(MVTec AD layout: <dataset>/train/good, <dataset>/test/<type>, <dataset>/ground_truth/<type>)")
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
        for path in _images_in(folder):
            mask = None
            if not good:
                mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"mask {mask} for defective image {path} not found; "
                                    "give every defective test image a ground_truth/<type>/<stem>_mask.png")
            samples.append(Sample(path, f"{folder.name}/{path.name}", 0 if good else 1, mask))
    if not samples:
        raise DataError(f"{test} holds no images; put test images in test/good/ and test/<defect type>/")
    return samples


def decode_image(data: np.ndarray | bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H, W, 3] (grey is repeated, alpha dropped, 16-bit scaled)."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if image is None:
        raise DataError(f"{name}: not a readable image (corrupt or unsupported format); replace or remove it")
    return to_rgb(image, name)


def to_rgb(image: np.ndarray, name: str, bgr: bool = True) -> np.ndarray:
    """Any decoded array [H, W] / [H, W, 1|3|4], uint8 or uint16 -> uint8 RGB [H, W, 3]."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise DataError(f"{name}: pixel type {image.dtype} is not supported; use 8- or 16-bit images")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2] if image.ndim == 3 else 0
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    raise DataError(f"{name}: image has shape {image.shape}; expected grey, RGB or RGBA")


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a file; DataError naming the file if it cannot be read."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check the path and permissions") from None
    return decode_image(data, str(path))


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """bool [H, W] defect mask (all False for None); DataError if missing or of another size."""
    if path is None:
        return np.zeros(shape, bool)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"{path}: mask not readable; masks are 8-bit PNGs, 0 normal and 255 defect")
    if mask.shape != shape:
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}; "
                        "masks must match their images' size")
    return mask > 0


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [size, size, 3] (area filter when shrinking, bilinear when growing)."""
    if image.shape[:2] == (size, size):
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def iter_batches(paths: Sequence[Path], size: int, batch: int,
                 keep_originals: bool = False) -> Iterator[tuple[np.ndarray, list[np.ndarray | tuple[int, int]]]]:
    """Yield (uint8 [B, size, size, 3] model inputs, per image its original RGB array or its (H, W)).

    Images are read and resized on a background thread so decoding overlaps inference.
    """

    def load(path: Path):
        image = read_image(path)
        return resize_to_input(image, size), (image if keep_originals else image.shape[:2])

    with ThreadPoolExecutor(1) as pool:
        chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
        pending = pool.submit(lambda c: [load(p) for p in c], chunks[0]) if chunks else None
        for k in range(len(chunks)):
            loaded = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(lambda c: [load(p) for p in c], chunks[k + 1])
            yield np.stack([x for x, _ in loaded]), [o for _, o in loaded]
