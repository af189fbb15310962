"""Drift watch: does a stream still look like the normal images its model was calibrated on?

Per stream, the normalised image scores of the last `window` frames are compared with the
normalised scores of the model's held-out normal images (thresholds.json "normal_scores") by a
two-sample Kolmogorov-Smirnov test, every `every` frames once the window is full. The alarm rises
when the KS statistic D reaches `statistic` (at least that share of the score mass has moved: an
effect size, so a large window does not alarm on a trifle) and the test's p-value is below `p`.

Every frame counts, not only those judged normal: a shift (lens out of focus, camera moved, lens
dirty; lighting only beyond what the models' photometric standardisation evens out) that pushes
frames over the threshold would otherwise hide itself by leaving the normal set. A real defect rate r moves D by at most r, far below the bar of 0.5. The alarm falls when a
later window passes the test again. Its remedy is to re-calibrate: refit on current normal images.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D = sup |F_a - F_b| and its asymptotic two-sided p-value."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    both = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, both, "right") / len(a) - np.searchsorted(b, both, "right") / len(b))))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d  # Stephens' correction of the Kolmogorov distribution for finite samples
    if lam < 1e-3:
        return d, 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, float(min(1.0, max(0.0, p)))


@dataclasses.dataclass
class DriftWatch:
    """One stream's watch. reference: normalised scores of normal calibration images, float [n]."""

    reference: np.ndarray
    window: int = 200
    every: int = 50
    statistic: float = 0.5
    p: float = 0.001
    alarm: bool = False
    last: tuple[float, float] | None = None  # (D, p) of the last test
    alarms: int = 0  # times the alarm rose
    first_alarm_frame: int | None = None
    frames: int = 0
    scores: collections.deque = dataclasses.field(default_factory=collections.deque)

    def __post_init__(self):
        self.reference = np.asarray(self.reference, np.float64)
        self.scores = collections.deque(maxlen=self.window)

    def add(self, score: float) -> bool:
        """Take one frame's normalised score; True when this frame changed the alarm."""
        self.scores.append(score)
        self.frames += 1
        if len(self.scores) < self.window or self.frames % self.every:
            return False
        self.last = ks_2samp(np.fromiter(self.scores, np.float64), self.reference)
        alarm = self.last[0] >= self.statistic and self.last[1] < self.p
        changed = alarm != self.alarm
        if alarm and changed:
            self.alarms += 1
            self.first_alarm_frame = self.first_alarm_frame if self.first_alarm_frame is not None else self.frames
        self.alarm = alarm
        return changed

    def state(self) -> dict:
        d, p = self.last or (None, None)
        return {"alarm": self.alarm, "statistic": d, "p": p, "frames": self.frames, "alarms": self.alarms,
                "first_alarm_frame": self.first_alarm_frame, "window": self.window,
                "test": f"two-sample KS of the last {self.window} scores against {len(self.reference)} normal "
                        f"calibration scores, every {self.every} frames; alarm at D >= {self.statistic} and "
                        f"p < {self.p}"}


def drift_reference(model_dir) -> np.ndarray | None:
    """The model's normal calibration scores (validated artifact), or None for a model fitted without them."""
    import json
    from pathlib import Path

    from calibration.artifact import load_manifest

    load_manifest(model_dir)  # a damaged or foreign model is refused here, with the command that rebuilds it
    scores = json.loads((Path(model_dir) / "thresholds.json").read_text()).get("normal_scores")
    return None if not scores else np.asarray(scores, np.float64)
