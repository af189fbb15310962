"""Score a model on <data>/test and measure it against the ground-truth masks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from calibration import metrics
from calibration.dataset import iter_batches, read_mask, evaluation_samples
from calibration.maps import normalise, overlay, to_original_size
from calibration.model import InspectionModel

Progress = Callable[[str, int, int], None]


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def evaluate(model: InspectionModel, data: str | Path, batch_size: int = 16, maps_dir: Path | None = None,
             scores_dir: Path | None = None, progress: Progress | None = None) -> dict:
    """Metrics dict (image_/pixel_ AUROC, AP, F1-max, pixel AU-PRO, images_per_s, n_images).

    Pixel metrics are computed at each mask's original resolution. scores_dir receives float32
    TIFF score maps at the original size, named by the image's path relative to test/.
    """
    samples = evaluation_samples(data)
    size = model.input_size
    maps, scores = [], np.empty(len(samples), np.float32)
    keep = maps_dir is not None
    seconds, done = 0.0, 0
    with model:
        start = time.perf_counter()
        for images, originals in iter_batches([s.path for s in samples], size, batch_size, keep_originals=keep):
            patch, image_scores = model.score(images)
            for k in range(len(images)):
                shape = originals[k].shape[:2] if keep else originals[k]
                maps.append(to_original_size(model.smooth(patch[k]), shape))
            scores[done:done + len(images)] = image_scores
            seconds += time.perf_counter() - start
            if maps_dir is not None:
                for k in range(len(images)):
                    sample = samples[done + k]
                    heat = normalise(maps[done + k], model.thresholds["pixel"])
                    _write(maps_dir / Path(sample.rel).with_suffix(".png"), overlay(originals[k], heat, heat >= 0.5))
            if scores_dir is not None:
                for k in range(len(images)):
                    _write(scores_dir / Path(samples[done + k].rel).with_suffix(".tiff"), maps[done + k])
            done += len(images)
            if progress:
                progress("score", done, len(samples))
            start = time.perf_counter()

    labels = np.array([s.label for s in samples])
    masks = [read_mask(s.mask_path, m.shape) for s, m in zip(samples, maps)]
    image = metrics.image_metrics(scores, labels)
    pixel = metrics.pixel_metrics(maps, masks)
    return {
        "image_auroc": image["auroc"], "image_ap": image["ap"], "image_f1max": image["f1max"],
        "pixel_auroc": pixel["auroc"], "pixel_ap": pixel["ap"], "pixel_f1max": pixel["f1max"],
        "pixel_aupro": pixel["aupro"],
        "images_per_s": len(samples) / seconds, "n_images": len(samples),
        "n_defective": int(labels.sum()), "pixel_metrics_resolution": "original mask size",
    }
