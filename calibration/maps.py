"""Anomaly-map arithmetic shared by evaluation and the postprocess workers (numpy and OpenCV only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch


def smooth_map(patch_map: np.ndarray, input_size: int, sigma: float) -> np.ndarray:
    """float32 [h, w] patch scores -> float32 [S, S] bilinear upsampled and Gaussian smoothed."""
    up = cv2.resize(patch_map, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        ksize = 2 * int(4 * sigma + 0.5) + 1
        up = cv2.GaussianBlur(up, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT_101)
    return up


def smooth_maps_torch(patch: "torch.Tensor", input_size: int, sigma: float) -> "torch.Tensor":
    """smooth_map for a batch on any torch device: float32 [N, h, w] -> float32 [N, S, S].

    Bilinear (half-pixel centres, as cv2.INTER_LINEAR) and a separable Gaussian with the same
    kernel size and reflected borders as smooth_map.
    """
    import torch
    import torch.nn.functional as F

    up = F.interpolate(patch[:, None].float(), size=(input_size, input_size), mode="bilinear", align_corners=False)
    if sigma > 0:
        radius = int(4 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, device=patch.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel /= kernel.sum()
        up = F.pad(up, (radius, radius, radius, radius), mode="reflect")
        up = F.conv2d(up, kernel.view(1, 1, 1, -1))
        up = F.conv2d(up, kernel.view(1, 1, -1, 1))
    return up[:, 0]


def to_original_size(smoothed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float32 [S, S] -> float32 [H, W] at an image's original size (bilinear)."""
    if smoothed.shape == tuple(shape):
        return smoothed
    return cv2.resize(smoothed, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def normalise(score: np.ndarray | float, stats: dict) -> np.ndarray:
    """Map raw scores so the threshold is 0.5 and the lowest normal calibration score 0, clipped to [0, 1]."""
    lo, thr = stats["min"], stats["threshold"]
    return np.clip(0.5 * (np.asarray(score, np.float32) - lo) / max(thr - lo, 1e-12), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, defect: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3], normalised map float32 [H, W] in [0, 1], bool [H, W] -> BGR uint8 overlay.

    Heat map blended over the image; defect regions (normalised score >= 0.5) outlined in red.
    """
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 0.6, colour, 0.4, 0)
    contours, _ = cv2.findContours(defect.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 2)
    return out


def defect_regions(heat: np.ndarray, min_area: int = 1) -> list[tuple[tuple[int, int, int, int], int, float]]:
    """Normalised map float32 [H, W] -> [(bbox (x, y, w, h), area, peak), ...] of 8-connected regions >= 0.5.

    Sorted by peak, highest first; regions smaller than min_area pixels are left out.
    """
    mask = (heat >= 0.5).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return []
    peaks = np.zeros(n, np.float32)
    np.maximum.at(peaks, labels[mask > 0], heat[mask > 0])
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area:
            out.append(((x, y, w, h), area, float(peaks[i])))
    return sorted(out, key=lambda r: -r[2])
