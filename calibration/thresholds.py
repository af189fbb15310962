"""Thresholds and score normalisation from normal images the model did not learn from.

Every kind hands in the raw maps of held-out normal frames (the memory bank: training images
scored without their own patches; reconstruction: images held out of training). From them:

- image threshold: by default the largest image score (with N images about 1/(N+1) of unseen
  normal frames score above it); with a false-reject target r, the order statistic that leaves
  floor(r * N) of the N above it, so the expected rate on unseen normal frames is
  (floor(r * N) + 1) / (N + 1) <= r + 1 / (N + 1);
- pixel threshold: the same rule over the largest value of each frame's smoothed map (the
  threshold of the defect regions), and the lowest smoothed value, for normalisation.

Normalised score = clip(0.5 * (s - min) / (threshold - min), 0, 1): 0.5 is the threshold.
"""

from __future__ import annotations

import math

import numpy as np

from calibration.maps import MapConfig, image_score, normalise, smooth
from engines.errors import ConfigError


def order_threshold(values: np.ndarray, max_false_reject: float | None) -> tuple[float, int]:
    """(threshold, how many of `values` lie above it): the maximum, or the target's order statistic."""
    ordered = np.sort(np.asarray(values, np.float64))[::-1]
    allowed = 0 if max_false_reject is None else int(math.floor(max_false_reject * len(ordered)))
    allowed = min(allowed, len(ordered) - 1)
    return float(ordered[allowed]), allowed


def calibrate(canvas_maps: list[np.ndarray], config: MapConfig, max_false_reject: float | None = None,
              source: str = "", images: list[str] | None = None) -> dict:
    """The thresholds.json record from the raw canvas maps (float32 [h, w] each) of held-out normal frames."""
    if not canvas_maps:
        raise ConfigError("no held-out normal images to calibrate thresholds on")
    if max_false_reject is not None and not 0.0 < max_false_reject < 1.0:
        raise ConfigError(f"max false-reject rate {max_false_reject} must be in (0, 1), e.g. 0.01")
    bad = [i for i, m in enumerate(canvas_maps) if not np.isfinite(m).all()]
    if bad:  # a threshold of inf or NaN would pass or reject every frame without saying so
        raise ValueError(f"calibration maps {bad[:5]} hold a score that is not finite: a bug, not the data")
    scores = np.array([image_score(m, config) for m in canvas_maps])
    smoothed = [smooth(m, config) for m in canvas_maps]
    peaks = np.array([s.max() for s in smoothed])
    lows = np.array([s.min() for s in smoothed])
    n = len(scores)
    image_thr, allowed = order_threshold(scores, max_false_reject)
    pixel_thr, _ = order_threshold(peaks, max_false_reject)
    rule = ("the largest score" if max_false_reject is None else
            f"the score with floor({max_false_reject} * {n}) = {allowed} of the {n} above it")
    record = {
        "method": f"{rule} of {n} held-out normal images ({source}); normalised score = "
                  "0.5 * (s - min) / (threshold - min), clipped to [0, 1]",
        "n_images": n,
        "images": images or [],
        "max_false_reject": max_false_reject,
        "expected_false_reject": (allowed + 1) / (n + 1),
        "above_threshold": allowed,
        "image": {"threshold": image_thr, "min": float(scores.min()), "mean": float(scores.mean()),
                  "std": float(scores.std())},
        # the normalised scores of these normal images: the reference of the streams' drift watch
        "normal_scores": [round(float(v), 6) for v in np.sort(normalise(scores, {"threshold": image_thr,
                                                                                "min": float(scores.min())}))],
        "pixel": {"threshold": pixel_thr, "min": float(lows.min())},
    }
    if max_false_reject is not None and n < math.ceil(1.0 / max_false_reject):
        record["warning"] = (f"{n} normal images cannot resolve a false-reject rate of {max_false_reject}: "
                             f"the threshold is their maximum, expected rate {1 / (n + 1):.3f}; "
                             f"fit on at least {math.ceil(1.0 / max_false_reject)} normal images")
    return record
