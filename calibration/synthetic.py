"""Synthetic products with planted defects: a dataset in MVTec AD layout that needs no download.

A normal frame is a woven, slightly uneven surface (two sinusoid gratings, low-frequency
shading, fine grain) with a random shift; a defective one has a scratch, a stain or a hole
painted on, and its mask.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECT_TYPES = ("scratch", "stain", "hole")


def normal_frame(rng: np.random.Generator, size: int, width: int | None = None,
                 period: float | None = None) -> np.ndarray:
    """uint8 RGB [size, width or size, 3] normal surface; the weave repeats every `period` pixels (size / 12)."""
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32)
    period = period or size / 12.0
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1])
    shade = cv2.resize(rng.normal(0, 1, (4, 4)).astype(np.float32), (width, size), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 1, (size, width)).astype(np.float32)
    grey = 140 + 35 * weave + 6 * shade + 5 * grain
    tint = np.array([1.0, 0.93, 0.8], np.float32)
    return np.clip(grey[:, :, None] * tint, 0, 255).astype(np.uint8)


def plant_defect(image: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect of `kind` on a copy of image; returns (uint8 RGB [H, W, 3], uint8 mask [H, W] 0/255)."""
    h, w = image.shape[:2]
    size = min(h, w)
    out = image.copy()
    mask = np.zeros(image.shape[:2], np.uint8)
    centre = np.array([rng.integers(w // 5, w - w // 5), rng.integers(h // 5, h - h // 5)])
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.3) * size
        d = np.array([np.cos(angle), np.sin(angle)]) * half
        p0, p1 = tuple(int(v) for v in centre - d), tuple(int(v) for v in centre + d)
        thickness = max(2, size // 64)
        cv2.line(mask, p0, p1, 255, thickness)
        cv2.line(out, p0, p1, (235, 235, 225), thickness)
    elif kind == "stain":
        axes = tuple(int(v) for v in rng.uniform(0.06, 0.12, 2) * size)
        cv2.ellipse(mask, tuple(int(v) for v in centre), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        out[mask > 0] = (out[mask > 0] * np.array([0.55, 0.45, 0.35])).astype(np.uint8)
    elif kind == "hole":
        radius = int(rng.uniform(0.04, 0.08) * size)
        cv2.circle(mask, tuple(int(v) for v in centre), radius, 255, -1)
        out[mask > 0] = 25
    else:
        raise ValueError(f"unknown defect kind {kind!r}; valid: {', '.join(DEFECT_TYPES)}")
    return out, mask


def make_dataset(root: str | Path, n_train: int = 24, n_good: int = 6, n_defect: int = 4, size: int = 256,
                 seed: int = 0, width: int | None = None, period: float | None = None) -> Path:
    """Write a synthetic dataset in MVTec AD layout under root (n_defect images per defect type);
    frames are size x (width or size) pixels with the weave repeating every `period` pixels."""
    root = Path(root)
    rng = np.random.default_rng(seed)

    def save(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
        if not cv2.imwrite(str(path), bgr):
            raise OSError(f"could not write {path}")

    def frame():
        return normal_frame(rng, size, width, period)

    for i in range(n_train):
        save(root / "train" / "good" / f"{i:03d}.png", frame())
    for i in range(n_good):
        save(root / "test" / "good" / f"{i:03d}.png", frame())
    for kind in DEFECT_TYPES:
        for i in range(n_defect):
            image, mask = plant_defect(frame(), rng, kind)
            save(root / "test" / kind / f"{i:03d}.png", image)
            save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root
