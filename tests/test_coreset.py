"""Greedy k-center coreset (calibration/coreset.py) against a naive reference."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.coreset import _project, greedy_coreset


def _naive_greedy(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """PatchCore's greedy k-center, written plainly in float64: first pick seeded, then the farthest point."""
    x = x.astype(np.float64)
    m = len(x)
    picks = [int(np.random.default_rng(seed).integers(m))]
    mind = np.linalg.norm(x - x[picks[0]], axis=1)
    while len(picks) < min(n, m):
        nxt = int(np.argmax(mind))
        picks.append(nxt)
        mind = np.minimum(mind, np.linalg.norm(x - x[nxt], axis=1))
    return np.array(picks)


def _covering_radius(x: np.ndarray, picks: np.ndarray) -> float:
    """max over all rows of the distance to the nearest picked row."""
    x = x.astype(np.float64)
    c = x[picks]
    d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return float(np.sqrt(np.maximum(d2.min(axis=1), 0)).max())


def _clustered(m: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 5
    return (centres[rng.integers(clusters, size=m)] + rng.standard_normal((m, d))).astype(np.float32)


@pytest.mark.parametrize("proj_dim, seed", [(16, 0), (16, 5), (0, 3), (128, 1)])
def test_exact_regime_equals_naive_greedy(proj_dim, seed):
    features = np.random.default_rng(100 + seed).standard_normal((400, 64)).astype(np.float32)
    n = 40
    got = greedy_coreset(features, n, proj_dim=proj_dim, seed=seed)
    x = _project(features, proj_dim, seed)
    assert x.shape == (400, proj_dim if 0 < proj_dim < 64 else 64)
    want = _naive_greedy(x, n, seed)
    assert got.dtype == np.int64 and got.shape == (n,)
    np.testing.assert_array_equal(got, want)  # same picks in the same order


def test_exact_regime_ids_distinct_and_clipped():
    features = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    picks = greedy_coreset(features, 20, proj_dim=0)
    assert len(picks) == 20 and len(np.unique(picks)) == 20
    assert picks.min() >= 0 and picks.max() < 50
    everything = greedy_coreset(features, 80, proj_dim=0)  # n > M clips to M
    assert len(everything) == 50
    np.testing.assert_array_equal(np.sort(everything), np.arange(50))


def test_exact_regime_boundary_is_two_chunks():
    # M == 2 * chunk is still the exact regime: the same picks as with the default chunk
    features = _clustered(1000, 16, 10, seed=7)
    np.testing.assert_array_equal(greedy_coreset(features, 60, proj_dim=0, chunk=500),
                                  greedy_coreset(features, 60, proj_dim=0))


def test_two_stage_regime_covering_radius():
    features = _clustered(3000, 64, 30, seed=1)
    rng = np.random.default_rng(11)
    features = features[rng.permutation(len(features))]
    n, proj_dim, seed = 100, 16, 0
    x = _project(features, proj_dim, seed)

    two_stage = greedy_coreset(features, n, proj_dim=proj_dim, seed=seed, chunk=500)
    exact = greedy_coreset(features, n, proj_dim=proj_dim, seed=seed)  # default chunk: exact regime
    np.testing.assert_array_equal(exact, _naive_greedy(x, n, seed))

    assert two_stage.dtype == np.int64 and len(two_stage) == n
    assert len(np.unique(two_stage)) == n
    assert two_stage.min() >= 0 and two_stage.max() < len(features)
    assert not np.array_equal(np.sort(two_stage), np.sort(exact))  # the two-stage path really ran

    r_two, r_exact = _covering_radius(x, two_stage), _covering_radius(x, exact)
    r_random = _covering_radius(x, rng.choice(len(features), n, replace=False))
    assert r_two <= 2.5 * r_exact, (r_two, r_exact)
    assert r_two < r_random, (r_two, r_random)


def test_two_stage_is_deterministic():
    features = _clustered(3000, 32, 20, seed=2)
    a = greedy_coreset(features, 80, proj_dim=16, seed=3, chunk=500)
    b = greedy_coreset(features, 80, proj_dim=16, seed=3, chunk=500)
    np.testing.assert_array_equal(a, b)


def test_duplicate_rows_give_distinct_ids():
    rng = np.random.default_rng(4)
    distinct = rng.standard_normal((10, 8)).astype(np.float32)
    features = distinct[rng.permutation(np.repeat(np.arange(10), 10))]  # 100 rows, 10 distinct
    picks = greedy_coreset(features, 30, proj_dim=0)
    assert len(picks) == 30 and len(np.unique(picks)) == 30
    assert picks.min() >= 0 and picks.max() < 100
    # every distinct value is covered before any repeat: the first 10 picks are 10 different rows' values
    assert len(np.unique(features[picks[:10]], axis=0)) == 10


def test_duplicate_rows_two_stage_regime():
    rng = np.random.default_rng(5)
    distinct = rng.standard_normal((20, 8)).astype(np.float32)
    features = distinct[rng.integers(20, size=3000)]  # 3000 rows, 20 distinct
    picks = greedy_coreset(features, 100, proj_dim=0, chunk=500)
    assert len(picks) == 100 and len(np.unique(picks)) == 100
    assert len(np.unique(features[picks], axis=0)) == 20
