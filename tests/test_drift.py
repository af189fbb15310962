"""Drift watch: the KS test against scipy, alarms on shifted frames scored by a real model, quiet on clean ones."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from scipy import stats

from calibration.maps import normalise
from calibration.model import Inspector, Model
from calibration.synthetic import normal_frame
from engines.runtimes import Deployment
from pipeline import wire
from pipeline.drift import DriftWatch, drift_reference, ks_2samp
from pipeline.run import RunConfig, run_pipeline
from pipeline.sinks import Sink


@pytest.mark.parametrize("n, m, shift", [(12, 200, 0.0), (50, 200, 0.1), (100, 300, 0.3), (30, 40, 1.0)])
def test_ks_matches_scipy(n, m, shift):
    rng = np.random.default_rng(n + m)
    a, b = rng.normal(shift, 1, m), rng.normal(0, 1, n)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, abs=0.02)  # both asymptotic; scipy uses another finite-sample correction


def _shifted(image: np.ndarray, kind: str) -> np.ndarray:
    if kind == "darker":  # lighting dimmed by a fifth
        return (image * 0.8).astype(np.uint8)
    if kind == "blurred":  # the lens out of focus
        return cv2.GaussianBlur(image, (0, 0), 1.5)
    if kind == "rotated":  # the camera turned by 3 degrees
        h, w = image.shape[:2]
        return cv2.warpAffine(image, cv2.getRotationMatrix2D((w / 2, h / 2), 3.0, 1.0), (w, h),
                              borderMode=cv2.BORDER_REFLECT)
    return image


def test_the_alarm_fires_on_shifted_frames_and_stays_quiet_on_clean_ones(fitted_model):
    model = Model(fitted_model)
    reference = drift_reference(fitted_model)
    assert reference is not None and len(reference) == json.loads(
        (fitted_model / "thresholds.json").read_text())["n_images"]
    rng = np.random.default_rng(11)  # frames the model has never seen
    watches = {}
    with Inspector(model, Deployment(threads=2), 8) as inspector:
        for kind in ("clean", "darker", "blurred", "rotated"):
            watch = watches[kind] = DriftWatch(reference, window=120, every=20)
            for _ in range(300 // 8):
                frames = [_shifted(normal_frame(rng, 128), kind) for _ in range(8)]
                for r in inspector.inspect(frames):
                    watch.add(float(normalise(r.score, model.thresholds["image"])))
    assert watches["clean"].alarms == 0, watches["clean"].state()
    # the model standardises each frame's brightness and contrast, so dimmed lighting is no drift to it
    assert watches["darker"].alarms == 0, watches["darker"].state()
    for kind in ("blurred", "rotated"):
        assert watches[kind].alarm and watches[kind].first_alarm_frame == 120, (kind, watches[kind].state())


def _result(stream: str, seq: int, score: float) -> list:
    return wire.encode_result(wire.Result(stream, seq, 1, "defect" if score >= 0.5 else "ok", score))


def test_the_sink_watches_each_stream_and_clears_when_the_shift_ends():
    rng = np.random.default_rng(3)
    sink = Sink(drift_reference=rng.uniform(0.0, 0.5, 60))
    scores = {"cam0": rng.uniform(0.0, 0.5, 600),  # like the calibration throughout
              "cam1": np.concatenate([rng.uniform(0.0, 0.5, 200), rng.uniform(0.35, 0.9, 200),
                                      rng.uniform(0.0, 0.5, 200)])}  # shifted in the middle third
    for stream, values in scores.items():
        for seq, score in enumerate(values):
            sink.handle(_result(stream, seq, float(score)))
    drift = sink.summary()["drift"]
    assert drift["cam0"]["alarms"] == 0 and not drift["cam0"]["alarm"]
    assert drift["cam1"]["alarms"] == 1 and 200 < drift["cam1"]["first_alarm_frame"] <= 400
    assert not drift["cam1"]["alarm"]  # the last window is clean again
    assert "KS" in drift["cam1"]["test"]
    assert "--model" in Sink().summary()["drift"]["off"]  # no reference: no watch, and the summary says why


def test_a_clean_run_does_not_alarm(fitted_model):
    summary = run_pipeline(RunConfig(model=fitted_model, frames=300, batch=8))
    assert summary["results"] == 300
    watch = summary["drift"]["cam0"]
    assert watch["frames"] == 300 and watch["statistic"] is not None and watch["alarms"] == 0, watch
