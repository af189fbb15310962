"""Anomaly maps (calibration/maps.py): border evening, fitted from normal maps, never raising a score; the
8-bit defect map at the frame's size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calibration.maps import MapConfig, defect_map, even_border, fit_border, ring_depth, to_frame
from engines.errors import ConfigError


def _normal_maps(n: int, shape: tuple[int, int], ring: tuple[float, float], inner: tuple[float, float], seed: int = 0):
    """Maps whose outer ring draws from N(ring) and the rest from N(inner)."""
    rng = np.random.default_rng(seed)
    edge = ring_depth(*shape) == 0
    out = []
    for _ in range(n):
        m = rng.normal(*inner, shape)
        m[edge] = rng.normal(*ring, int(edge.sum()))
        out.append(m.astype(np.float32))
    return out


def test_ring_depth_counts_cells_to_the_nearest_edge():
    d = ring_depth(5, 7)
    assert d[0].tolist() == [0] * 7 and d[:, 0].tolist() == [0] * 5
    assert d[2, 3] == 2 and d[1, 1] == 1 and d.max() == 2


def test_a_loud_border_is_brought_down_to_the_interior():
    maps = _normal_maps(200, (16, 20), ring=(3.0, 2.0), inner=(1.0, 0.5))
    border = fit_border(maps, rings=1)
    assert len(border) == 1
    gain, offset = border[0]
    assert gain == pytest.approx(0.25, rel=0.05) and offset == pytest.approx(1.0 - 0.25 * 3.0, abs=0.05)
    config = MapConfig(border_rings=1, border=border)
    m = _normal_maps(1, (16, 20), ring=(3.0, 2.0), inner=(1.0, 0.5), seed=7)[0]
    evened = even_border(m, config)
    edge = ring_depth(16, 20) == 0
    assert np.array_equal(evened[~edge], m[~edge])  # the interior as it was
    assert np.all(evened <= m)  # never raised
    np.testing.assert_allclose(evened[edge], np.minimum(m[edge], gain * m[edge] + offset), rtol=1e-6)
    # the border no longer holds the normal maps' largest cells: it holds its share of cells (21 %)
    unseen = _normal_maps(50, (16, 20), ring=(3.0, 2.0), inner=(1.0, 0.5), seed=8)
    share = [[edge.ravel()[np.argsort(x.ravel())[-10:]].mean() for x in (u, even_border(u, config))] for u in unseen]
    before, after = np.mean(share, axis=0)
    assert before > 0.8 and after < 0.35


def test_a_quiet_border_is_never_raised():
    maps = _normal_maps(100, (12, 12), ring=(0.2, 0.05), inner=(1.0, 0.5))
    config = MapConfig(border_rings=2, border=fit_border(maps, rings=2))
    m = maps[0].copy()
    m[0, 5] = 9.0  # a defect on the border keeps its score
    evened = even_border(m, config)
    assert evened[0, 5] == 9.0 and np.all(evened <= m)


def test_statistics_and_zeros_follow_the_roi():
    maps = _normal_maps(100, (12, 12), ring=(3.0, 1.0), inner=(1.0, 0.5))
    inside = np.zeros((12, 12), bool)
    inside[:, :6] = True
    roi_maps = [np.where(inside, m, np.float32(0)) for m in maps]
    with_roi = fit_border(roi_maps, 1, [inside] * len(maps))
    edge = ring_depth(12, 12) == 0
    ring = np.concatenate([m[edge & inside] for m in maps]).astype(np.float64)
    inner = np.concatenate([m[~edge & inside] for m in maps]).astype(np.float64)
    gain = inner.std() / ring.std()
    np.testing.assert_allclose(with_roi[0], (gain, inner.mean() - gain * ring.mean()), rtol=1e-6)
    assert abs(fit_border(roi_maps, 1)[0][1] - with_roi[0][1]) > 0.1  # counting the zeros outside would differ
    evened = even_border(roi_maps[0], MapConfig(border_rings=1, border=with_roi), inside)
    assert np.all(evened[~inside] == 0)


def test_no_interior_no_evening_and_validation():
    assert fit_border(_normal_maps(10, (2, 8), (1, 1), (1, 1)), rings=1) == ()
    assert fit_border(_normal_maps(10, (8, 8), (1, 1), (1, 1)), rings=0) == ()
    m = np.ones((4, 4), np.float32)
    assert even_border(m, MapConfig()) is m  # nothing fitted: the map as it came
    with pytest.raises(ConfigError, match="border rings"):
        MapConfig(border_rings=1, border=((1.0, 0.0), (1.0, 0.0)))
    with pytest.raises(ConfigError, match="border rings"):
        MapConfig(border_rings=-1)


@pytest.mark.parametrize("frame", [(96, 160), (601, 455), (32, 32)])
def test_defect_map_is_the_frame_size_map_in_eight_bits(frame):
    rng = np.random.default_rng(3)
    heat = np.clip(cv2.GaussianBlur(rng.random((32, 32), dtype=np.float32), (0, 0), 2) * 2 - 0.5, 0, 1)
    roi = np.zeros(frame, bool)
    roi[frame[0] // 4:, : frame[1] // 2] = True
    want = to_frame(heat, frame) * 255
    got = defect_map(heat, frame)
    assert got.dtype == np.uint8 and got.shape == frame
    error = np.abs(got - want)  # rounding at the map's size, then OpenCV's fixed-point 8-bit interpolation
    assert error.max() <= 1.5 and error.mean() <= 0.5
    with_roi = defect_map(heat, frame, roi)
    np.testing.assert_array_equal(with_roi[~roi], 0)
    np.testing.assert_array_equal(with_roi[roi], got[roi])
