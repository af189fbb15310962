"""Anomaly-map arithmetic shared by fitting, evaluation and the postprocess workers, for every kind.

A model's raw map has one cell per `stride` canvas pixels (calibration.geometry). Its outer
`border_rings` rings of cells are first evened out (`even_border`): the network sees padding there,
and the normal scores of those cells run higher and wider than inside, so a normal frame's largest
cells used to lie on its border. Fit measures each ring's normal scores on the held-out frames and
finds the affine map onto the interior's (`fit_border`, stored as `MapConfig.border`); a cell takes
the smaller of its score and the mapped one, so a quiet border is never raised. From the map:

- the image score: the largest cell, or the mean of the `top_k` largest (`MapConfig.image_score`);
- the smoothed map: bilinear to canvas pixels, then a Gaussian blur of `blur_sigma` canvas pixels;
- the frame map: the smoothed map resized to the frame's own size;
- normalised scores: 0.5 at the calibrated threshold (calibration.thresholds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import cv2
import numpy as np

from engines.errors import ConfigError

if TYPE_CHECKING:
    import torch

IMAGE_SCORES = ("max", "topk")


@dataclasses.dataclass(frozen=True)
class MapConfig:
    """stride: canvas pixels per map cell (set by the model's network); blur_sigma: Gaussian smoothing in
    canvas pixels; image_score: "max" (PatchCore: the largest cell) or "topk" (mean of the top_k largest);
    border_rings: outer rings of cells evened out (0: none); border: per ring, outermost first, the
    fitted (gain, offset) of `even_border` (empty until fit measures it)."""

    stride: int = 8
    blur_sigma: float = 4.0
    image_score: str = "topk"
    top_k: int = 10
    border_rings: int = 2
    border: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "border", tuple(tuple(float(v) for v in ring) for ring in self.border))
        if self.border_rings < 0 or len(self.border) > self.border_rings:
            raise ConfigError(f"border rings ({self.border_rings}) must be >= 0 and cover the fitted border "
                              f"({len(self.border)} rings)")
        if self.image_score not in IMAGE_SCORES:
            raise ConfigError(f"unknown image score {self.image_score!r}; valid: {', '.join(IMAGE_SCORES)}")
        if self.blur_sigma < 0 or self.top_k < 1 or self.stride < 1:
            raise ConfigError(f"blur sigma ({self.blur_sigma}) must be >= 0, top-k ({self.top_k}) and stride >= 1")


def ring_depth(h: int, w: int) -> np.ndarray:
    """int [h, w]: each cell's distance in cells to the map's nearest edge (0 on the outer ring)."""
    y = np.minimum(np.arange(h), np.arange(h)[::-1])
    x = np.minimum(np.arange(w), np.arange(w)[::-1])
    return np.minimum.outer(y, x)


def fit_border(canvas_maps: list[np.ndarray], rings: int, insides: list[np.ndarray | None] | None = None
               ) -> tuple[tuple[float, float], ...]:
    """Normal canvas maps float32 [h_i, w_i] (cells `inside` the ROI, bool, when given) -> per ring
    (outermost first) the (gain, offset) that give its cells the interior's mean and std; () when the
    maps have no interior beyond `rings` rings."""
    insides = insides or [None] * len(canvas_maps)
    values: list[list[np.ndarray]] = [[] for _ in range(rings + 1)]  # rings, then the interior
    for grid_map, inside in zip(canvas_maps, insides):
        depth = np.minimum(ring_depth(*grid_map.shape), rings)
        for k in range(rings + 1):
            cells = depth == k if inside is None else (depth == k) & inside
            values[k].append(grid_map[cells].astype(np.float64))
    pooled = [np.concatenate(v) for v in values]
    if rings == 0 or any(len(v) < 2 for v in pooled):
        return ()
    mean, std = pooled[-1].mean(), pooled[-1].std()
    out = []
    for ring in pooled[:-1]:
        gain = std / ring.std() if ring.std() > 1e-12 else 1.0
        out.append((float(gain), float(mean - gain * ring.mean())))
    return tuple(out)


def border_planes(shape: tuple[int, int], config: MapConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 gain and offset [h, w] of `even_border` for a map of `shape` (None: nothing to even);
    read-only, made once per shape and border."""
    return _planes(tuple(shape), config.border) if config.border else None


@functools.lru_cache(maxsize=32)
def _planes(shape: tuple[int, int], border: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    depth = ring_depth(*shape)
    gain, offset = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    for k, (g, b) in enumerate(border):
        gain[depth == k], offset[depth == k] = g, b
    gain.flags.writeable = offset.flags.writeable = False
    return gain, offset


def even_border(grid_map: np.ndarray, config: MapConfig, inside: np.ndarray | None = None) -> np.ndarray:
    """float32 [h, w] canvas map -> float32 [h, w]: each outer-ring cell s becomes min(s, gain * s + offset)
    with its ring's (gain, offset) from config.border; cells outside `inside` (bool [h, w], the ROI) stay 0."""
    planes = border_planes(grid_map.shape, config)
    if planes is None:
        return grid_map
    out = np.minimum(grid_map, grid_map * planes[0] + planes[1])
    return out if inside is None else np.where(inside, out, np.float32(0))


def even_border_torch(grid_maps: "torch.Tensor", config: MapConfig) -> "torch.Tensor":
    """`even_border` for a batch on any torch device: float32 [N, h, w] -> float32 [N, h, w] (no ROI)."""
    import torch

    planes = border_planes(tuple(grid_maps.shape[1:]), config)
    if planes is None:
        return grid_maps
    gain, offset = (torch.from_numpy(p.copy()).to(grid_maps.device) for p in planes)
    return torch.minimum(grid_maps, grid_maps * gain + offset)


def image_score(grid_map: np.ndarray, config: MapConfig) -> float:
    """float32 [h, w] (cells outside the ROI hold 0) -> the image score."""
    flat = grid_map.ravel()
    if config.image_score == "max" or config.top_k == 1:
        return float(flat.max())
    k = min(config.top_k, flat.size)
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def smooth(grid_map: np.ndarray, config: MapConfig) -> np.ndarray:
    """float32 [h, w] cells -> float32 [h * stride, w * stride] canvas map, bilinear then Gaussian blur."""
    h, w = grid_map.shape
    up = cv2.resize(np.ascontiguousarray(grid_map, np.float32), (w * config.stride, h * config.stride),
                    interpolation=cv2.INTER_LINEAR)
    sigma = config.blur_sigma
    if sigma > 0:
        ksize = 2 * int(4 * sigma + 0.5) + 1
        up = cv2.GaussianBlur(up, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT_101)
    return up


def smooth_torch(grid_maps: "torch.Tensor", config: MapConfig) -> "torch.Tensor":
    """`smooth` for a batch on any torch device: float32 [N, h, w] -> float32 [N, h * stride, w * stride].

    Bilinear (half-pixel centres, as cv2.INTER_LINEAR) and a separable Gaussian with the same kernel
    size and reflected borders as `smooth`.
    """
    import torch
    import torch.nn.functional as F

    n, h, w = grid_maps.shape
    up = F.interpolate(grid_maps[:, None].float(), size=(h * config.stride, w * config.stride), mode="bilinear",
                       align_corners=False)
    sigma = config.blur_sigma
    if sigma > 0:
        radius = int(4 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, device=grid_maps.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel /= kernel.sum()
        up = F.pad(up, (radius, radius, radius, radius), mode="reflect")
        up = F.conv2d(up, kernel.view(1, 1, 1, -1))
        up = F.conv2d(up, kernel.view(1, 1, -1, 1))
    return up[:, 0]


def to_frame(canvas_map: np.ndarray, frame: tuple[int, int], roi: np.ndarray | None = None) -> np.ndarray:
    """float32 canvas map -> float32 [H0, W0] at the frame's size (bilinear); 0 outside the ROI (bool [H0, W0])."""
    h, w = int(frame[0]), int(frame[1])
    out = canvas_map if canvas_map.shape == (h, w) else cv2.resize(canvas_map, (w, h), interpolation=cv2.INTER_LINEAR)
    if roi is not None:
        out = np.where(roi, out, np.float32(0))
    return out


def defect_map(heat: np.ndarray, frame: tuple[int, int], roi: np.ndarray | None = None) -> np.ndarray:
    """Normalised map float32 [h, w] in [0, 1] -> the 8-bit defect map uint8 [H0, W0] (x 255, rounded at
    the map's size, then bilinear in 8 bits to the frame's: within 1.5 grey levels of `to_frame` x 255, never
    making the 20 MB float map of a 2448 x 2048 frame); 0 outside the ROI (bool [H0, W0])."""
    h, w = int(frame[0]), int(frame[1])
    heat8 = np.rint(heat * 255).astype(np.uint8)
    out = heat8 if heat8.shape == (h, w) else cv2.resize(heat8, (w, h), interpolation=cv2.INTER_LINEAR)
    if roi is not None:
        out = out * roi.astype(np.uint8)
    return out


def normalise(score: np.ndarray | float, stats: dict) -> np.ndarray:
    """Map raw scores so the threshold is 0.5 and the lowest normal calibration score 0, clipped to [0, 1]."""
    lo, thr = stats["min"], stats["threshold"]
    return np.clip(0.5 * (np.asarray(score, np.float32) - lo) / max(thr - lo, 1e-12), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3], normalised map float32 [h, w] in [0, 1] (resized to H x W if it differs)
    -> BGR uint8 overlay [H, W, 3].

    Heat map blended over the image; defect regions (normalised score >= 0.5) outlined in red.
    """
    if heat.shape != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]))
    defect = heat >= 0.5
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 0.6, colour, 0.4, 0)
    contours, _ = cv2.findContours(defect.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 2)
    return out


def regions(mask: np.ndarray, values: np.ndarray, scale: tuple[float, float] = (1.0, 1.0),
            min_area: int = 1) -> list[tuple[tuple[int, int, int, int], int, float]]:
    """8-connected regions of bool [H, W] `mask` -> [(bbox (x, y, w, h), area, peak of `values`), ...].

    `scale` (sy, sx) maps mask pixels to frame pixels (bbox and area scaled). Sorted by peak,
    highest first; regions smaller than min_area mask pixels are left out.
    """
    m = mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return []
    peaks = np.full(n, -np.inf, np.float32)
    np.maximum.at(peaks, labels[m > 0], values[m > 0])
    sy, sx = scale
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area:
            box = (int(x * sx), int(y * sy), max(1, int(round(w * sx))), max(1, int(round(h * sy))))
            out.append((box, max(1, int(round(area * sx * sy))), float(peaks[i])))
    return sorted(out, key=lambda r: -r[2])
