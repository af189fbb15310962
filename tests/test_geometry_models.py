"""Geometry and calibration with fitted models: tiles find defects at frame borders and between tiles,
nothing is reported outside a region of interest, and a false-reject target holds on unseen frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.model import Inspector, Model
from calibration.synthetic import make_dataset, normal_frame
from engines.runtimes import Deployment
from pipeline.cli import main

PERIOD = 10.0  # the weave repeats every 10 pixels, whatever the frame size


def _hole(image: np.ndarray, y: int, x: int, r: int = 6) -> np.ndarray:
    out = image.copy()
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    out[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 20
    return out


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A model of 64 x 64 tiles at scale 1 over 128 x 320 frames (2 x 7 tiles each)."""
    root = tmp_path_factory.mktemp("tiled")
    data = make_dataset(root / "data", n_train=10, n_good=2, n_defect=1, size=128, width=320, period=PERIOD)
    model = root / "model"
    assert main(["fit", str(data), "-o", str(model), "--tiles", "--input-size", "64", "--tile-scale", "1.0",
                 "--coreset-ratio", "0.25", "--threads", "2"]) == 0
    return Model(model)


def _decide(model: Model, frames: list[np.ndarray]):
    with Inspector(model, Deployment(threads=2)) as inspector:
        results = inspector.inspect(frames)
    return results, [model.decide(r.canvas_map, r.layout.frame, r.score) for r in results]


def _hit(decision, y: int, x: int, slack: int = 4) -> bool:
    return any(bx - slack <= x <= bx + bw + slack and by - slack <= y <= by + bh + slack
               for (bx, by, bw, bh), _, _ in decision.regions)


def test_tiled_model_finds_defects_at_the_border_and_between_tiles(tiled):
    assert tiled.geometry.tiling == "tiles" and (tiled.spec.height, tiled.spec.width) == (64, 64)
    rng = np.random.default_rng(11)
    clean = normal_frame(rng, 128, 320, PERIOD)
    layout = tiled.layout(clean.shape[:2])
    assert layout.count >= 10  # many tiles, one frame
    seam_x = layout.origins[1][1] + 64 // 2 - 8  # inside the overlap of the first two tiles of a row
    spots = {"corner": (6, 6), "right border": (64, 314), "between tiles": (64, seam_x)}
    frames = [clean] + [_hole(clean, y, x) for y, x in spots.values()]
    results, decisions = _decide(tiled, frames)
    assert decisions[0].verdict == "ok"
    for (name, (y, x)), decision, r in zip(spots.items(), decisions[1:], results[1:]):
        assert decision.verdict == "defect", name
        assert _hit(decision, y, x), (name, decision.regions)
        assert r.score > results[0].score
    assert all(r.canvas_map.shape == layout.grid for r in results)


def test_nothing_is_reported_outside_the_roi(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=10, n_good=2, n_defect=1, size=96, width=192, period=PERIOD)
    model_dir = tmp_path / "model"
    # the left half of the 96 x 192 frames only
    assert main(["fit", str(data), "-o", str(model_dir), "--roi", "0,0,96,96", "--input-size", "64x128",
                 "--coreset-ratio", "0.25"]) == 0
    model = Model(model_dir)
    assert model.geometry.roi == "roi.png" and (model_dir / "roi.png").is_file()
    assert "roi.png" in json.loads((model_dir / "manifest.json").read_text())["files"]
    rng = np.random.default_rng(12)
    clean = normal_frame(rng, 96, 192, PERIOD)
    inside, outside = _hole(clean, 48, 40, 8), _hole(clean, 48, 150, 8)
    results, (d_clean, d_in, d_out) = _decide(model, [clean, inside, outside])
    assert d_in.verdict == "defect" and _hit(d_in, 48, 40)
    assert d_out.verdict == "ok" and d_out.regions == []
    assert d_out.score <= d_clean.score + 0.05  # the hole outside changes nothing that is scored
    frame_map = model.frame_map(results[2].canvas_map, results[2].layout)
    assert frame_map.shape == (96, 192) and not frame_map[:, 100:].any()  # no score at all outside


def test_false_reject_target_holds_on_unseen_normal_frames(tmp_path):
    """With a target r fitted on N normal images, the count of unseen normal frames flagged follows
    a beta-binomial law (the threshold is an order statistic of exchangeable scores): check it lies
    in its 99% interval, and that the rate sits near the expected (floor(rN) + 1) / (N + 1)."""
    from scipy.stats import betabinom

    n, m, target = 120, 240, 0.1
    data = make_dataset(tmp_path / "data", n_train=n, n_good=m, n_defect=0, size=64, period=PERIOD, seed=5)
    model_dir = tmp_path / "model"
    assert main(["fit", str(data), "-o", str(model_dir), "--input-size", "64", "--max-false-reject", str(target),
                 "--calib-images", str(n), "--coreset-ratio", "0.25"]) == 0
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    allowed = int(np.floor(target * n))
    assert thresholds["n_images"] == n and thresholds["above_threshold"] == allowed
    assert thresholds["max_false_reject"] == target
    assert thresholds["expected_false_reject"] == pytest.approx((allowed + 1) / (n + 1))
    from calibration.dataset import evaluation_samples, read_images

    model = Model(model_dir)
    frames = list(read_images([s.path for s in evaluation_samples(data)]))
    _, decisions = _decide(model, frames)
    flagged = sum(d.verdict == "defect" for d in decisions)
    # P(new score above the (allowed + 1)-th largest of n) = Beta(allowed + 1, n - allowed)
    law = betabinom(m, allowed + 1, n - allowed)
    lo, hi = law.ppf(0.005), law.ppf(0.995)
    assert lo <= flagged <= hi, (flagged, lo, hi)


def test_a_target_finer_than_the_data_says_so(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=12, n_good=1, n_defect=1, size=64, period=PERIOD)
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), "--input-size", "64", "--max-false-reject", "0.01"]) == 0
    thresholds = json.loads((tmp_path / "m" / "thresholds.json").read_text())
    assert "100 normal images" in thresholds["warning"] and thresholds["above_threshold"] == 0
