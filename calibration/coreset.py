"""Greedy k-center coreset (PatchCore's subsampling), fast on a CPU.

PatchCore picks bank vectors one at a time, each the point farthest from those already
picked, in a random projection of the features: one pass over all M points per pick, which
is why it dominates fit time in the published library (M = 779k patches and 78k picks for
761 images is ~10 hours there).

Here the passes work on squared distances in a cache-sized float32 block. Up to
`2 * chunk` points the result is PatchCore's greedy exactly. Above that, the points are
split into chunks of `chunk` consecutive rows (consecutive images), greedy picks
`oversample * n * len(chunk) / M` points in each, and a final greedy picks n from their
union (a composable coreset, Malkomes et al. 2015: the covering radius is at most the sum
of the two stages' radii). Each stage's block stays in cache, so a pick costs microseconds
instead of a pass over main memory.
"""

from __future__ import annotations

import numpy as np


def _project(features: np.ndarray, proj_dim: int, seed: int) -> np.ndarray:
    d = features.shape[1]
    if proj_dim <= 0 or proj_dim >= d:
        return np.ascontiguousarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((d, proj_dim)).astype(np.float32) / np.float32(np.sqrt(proj_dim))
    return features @ matrix


def _greedy(x: np.ndarray, n: int, first: int) -> np.ndarray:
    """Exact greedy k-center on float32 [m, d]: int64 [min(n, m)] row ids in pick order, starting at first."""
    m = len(x)
    n = min(n, m)
    sq = np.einsum("ij,ij->i", x, x)
    picks = np.empty(n, np.int64)
    mind = np.full(m, np.inf, np.float32)  # squared distance to the nearest pick
    d2 = np.empty(m, np.float32)
    pick = first
    for t in range(n):
        picks[t] = pick
        c = x[pick]
        np.dot(x, c, out=d2)
        d2 *= -2.0
        d2 += sq
        d2 += sq[pick]
        np.minimum(mind, d2, out=mind)
        pick = int(np.argmax(mind))
    return picks


def greedy_coreset(features: np.ndarray, n: int, proj_dim: int = 128, seed: int = 0, chunk: int = 16384,
                   oversample: float = 2.0) -> np.ndarray:
    """Pick n rows of features float32 [M, D]; returns int64 [n] distinct row ids.

    Distances are Euclidean in a seeded Gaussian random projection to proj_dim dimensions
    (0 or >= D: none); the first pick is a seeded random row. Exact greedy up to 2 * chunk
    rows, the two-stage composable greedy above (see the module docstring).
    """
    m = len(features)
    n = int(min(max(n, 1), m))
    x = _project(features, proj_dim, seed)
    rng = np.random.default_rng(seed)
    if m <= 2 * chunk or n >= m // 2:
        picks = _greedy(x, n, int(rng.integers(m)))
    else:
        candidates = []
        for start in range(0, m, chunk):
            block = x[start:start + chunk]
            want = int(np.ceil(oversample * n * len(block) / m))
            candidates.append(start + _greedy(block, want, int(rng.integers(len(block)))))
        union = np.concatenate(candidates)
        if len(union) <= n:
            picks = union
        else:
            picks = union[_greedy(x[union], n, int(rng.integers(len(union))))]
    return _fill_duplicates(picks, m, n)


def _fill_duplicates(picks: np.ndarray, m: int, n: int) -> np.ndarray:
    """Greedy repeats a row only once every row is covered (duplicates in the data): replace repeats by unused rows."""
    unique = np.unique(picks)
    if len(unique) == len(picks) == n:
        return picks
    _, first = np.unique(picks, return_index=True)
    kept = picks[np.sort(first)]
    rest = np.setdiff1d(np.arange(m), kept)[: n - len(kept)]
    return np.concatenate([kept, rest])
