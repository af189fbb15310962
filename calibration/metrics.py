"""Exact anomaly-detection metrics: AUROC, AP, F1-max and AU-PRO.

All curves are exact (every distinct score is a threshold, tied scores move
together) and are built from a single descending sort, the way scikit-learn's
``_binary_clf_curve`` does it, so ``roc_auc``, ``average_precision`` and
``f1_max`` agree with ``sklearn.metrics`` including tie handling.  The pixel
metrics sort all pixels once (packed uint64 keys, see ``_pixel_ranking``) and
derive AUROC, AP, F1-max and AU-PRO from that sort.  Only numpy and OpenCV
(8-connected components for AU-PRO) are used; scikit-learn is test-only.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

__all__ = [
    "roc_auc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "pixel_metrics",
    "au_pro",
]


# --------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------


class _Ranking:
    """Cumulative counts at every distinct score of one descending sort.

    Built from ``s`` (scores, or any tie-equivalent keys, sorted descending)
    and ``y`` (bool labels in the same order).

    Attributes:
        pos: int array [P], sorted positions of the positive samples.
        tps, fps: int arrays [D], cumulative true/false positives at the last
            index of each of the D distinct scores (highest score first).
        n_pos, n_neg: number of positive / negative samples.
    """

    def __init__(self, s: np.ndarray, y: np.ndarray):
        is_last = np.empty(y.size, dtype=bool)  # last index of each run of equal scores
        np.not_equal(s[1:], s[:-1], out=is_last[:-1])
        is_last[-1] = True
        last = np.flatnonzero(is_last)
        del is_last
        self.pos = np.flatnonzero(y)
        self.tps = np.searchsorted(self.pos, last, side="right")
        self.fps = last + 1 - self.tps
        self.n_pos = int(self.tps[-1])
        self.n_neg = int(self.fps[-1])

    def auroc(self) -> float:
        # trapezoid rule on integer counts: exact until the final division
        tps = np.concatenate(([0], self.tps))
        area2 = np.sum(np.diff(self.fps, prepend=0) * (tps[1:] + tps[:-1]))
        return float(area2 / (2.0 * self.n_pos * self.n_neg))

    def ap(self) -> float:
        precision = self.tps / (self.tps + self.fps)
        d_tps = np.diff(self.tps, prepend=0)
        return float(np.dot(d_tps, precision) / self.n_pos)

    def f1max(self) -> float:
        # 2PR/(P+R) with P = tp/(tp+fp), R = tp/n_pos  ==  2 tp / (n_pos + tp + fp)
        return float(np.max(2.0 * self.tps / (self.n_pos + self.tps + self.fps)))

    def iou_max(self) -> float:
        # IoU of the predicted and true sets, pooled: tp / (tp + fp + fn) == tp / (n_pos + fp)
        return float(np.max(self.tps / (self.n_pos + self.fps)))

    def roc_curve(self, points: int = 512) -> dict:
        """{"fpr": [...], "tpr": [...]} at most `points` (plus both ends) of the exact curve, for plots."""
        fpr = np.concatenate(([0.0], self.fps / self.n_neg))
        tpr = np.concatenate(([0.0], self.tps / self.n_pos))
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
        return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}


def _check_scores_labels(scores, labels, name: str):
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"{name}: scores and labels must be 1-D arrays of equal length, "
            f"got shapes {scores.shape} and {labels.shape}"
        )
    if scores.size == 0:
        raise ValueError(f"{name}: got empty scores/labels")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"{name}: scores must be real numbers, got dtype {scores.dtype}")
    if np.isnan(scores).any():
        raise ValueError(f"{name}: scores contain NaN")
    if labels.dtype != bool:
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError(
                f"{name}: labels must be bool or 0/1, got values {np.unique(labels)[:10]}"
            )
        labels = labels == 1
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        which = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{name}: labels contain only one class ({labels.size} samples, all "
            f"{which}); both normal and anomalous samples are required"
        )
    return scores, labels


def _rank(scores, labels, name: str) -> _Ranking:
    scores, labels = _check_scores_labels(scores, labels, name)
    order = np.argsort(scores)[::-1]
    return _Ranking(scores[order], labels[order])


# --------------------------------------------------------------------------
# image-level (1-D) metrics
# --------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: float array [N], higher = more anomalous.
        labels: bool or 0/1 array [N], 1 = anomalous.
    """
    return _rank(scores, labels, "roc_auc").auroc()


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (equals ``sklearn.metrics.average_precision_score``).

    Args:
        scores: float array [N], higher = more anomalous.
        labels: bool or 0/1 array [N], 1 = anomalous.
    """
    return _rank(scores, labels, "average_precision").ap()


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Maximum F1 over all points of the exact precision-recall curve.

    Args:
        scores: float array [N], higher = more anomalous.
        labels: bool or 0/1 array [N], 1 = anomalous.
    """
    return _rank(scores, labels, "f1_max").f1max()


def image_metrics(scores, labels, curves: bool = False) -> dict:
    """AUROC, AP and F1-max from one sort.

    Args:
        scores: float array [N]; labels: bool or 0/1 array [N], 1 = anomalous.
        curves: also return "roc": {"fpr", "tpr"} lists.
    Returns:
        {"auroc", "ap", "f1max"}: floats in [0, 1] (and the curve).
    """
    r = _rank(scores, labels, "image_metrics")
    out = {"auroc": r.auroc(), "ap": r.ap(), "f1max": r.f1max()}
    if curves:
        out["roc"] = r.roc_curve()
    return out


# --------------------------------------------------------------------------
# pixel-level metrics and AU-PRO
# --------------------------------------------------------------------------


# A pixel is packed into one uint64: the high 32 bits are its float32 score
# mapped to an order-preserving unsigned integer, the low 32 bits its region id
# (0 = normal).  One plain sort of these keys replaces an argsort plus gathers.
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)


def _ordered_bits(m: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint32 [n] whose unsigned order is the float order."""
    u = (m + np.float32(0)).view(np.uint32)  # adding +0 turns -0.0 into +0.0
    return np.where(u >= 0x80000000, ~u, u | np.uint32(0x80000000))


def _pixel_ranking(maps, masks, name: str):
    """Sort all pixels of all images once (descending score).

    Returns the _Ranking, the region id (1..R) of each defect pixel in sorted
    order (int array [P]) and R, the number of 8-connected defect regions
    (counted per image).
    """
    maps, masks = list(maps), list(masks)
    if len(maps) != len(masks) or not maps:
        raise ValueError(
            f"{name}: need equally many maps and masks (at least one), "
            f"got {len(maps)} maps and {len(masks)} masks"
        )
    for i, (m, k) in enumerate(zip(maps, masks)):
        if np.ndim(m) != 2 or np.shape(m) != np.shape(k):
            raise ValueError(
                f"{name}: map {i} and mask {i} must be 2-D with equal shapes, "
                f"got {np.shape(m)} and {np.shape(k)}"
            )
    n = sum(int(np.size(m)) for m in maps)
    keys = np.empty(n, dtype=np.uint64)
    words = keys.view(np.uint32).reshape(n, 2)
    n_regions = n_pos = start = 0
    for i, (m, k) in enumerate(zip(maps, masks)):
        m = np.asarray(m, dtype=np.float32).ravel()
        if m.size == 0:
            continue
        if np.isnan(m).any():
            raise ValueError(f"{name}: map {i} contains NaN")
        count, lab = cv2.connectedComponents((np.asarray(k) != 0).astype(np.uint8), connectivity=8)
        defect = lab > 0
        lab[defect] += n_regions
        n_regions += count - 1
        n_pos += int(np.count_nonzero(defect))
        words[start : start + m.size, _HI] = _ordered_bits(m)
        words[start : start + m.size, _LO] = lab.ravel()
        start += m.size
    if n_pos == 0:
        raise ValueError(
            f"{name}: masks contain no defect pixels ({len(masks)} masks, {n} pixels, "
            "0 defect regions)"
        )
    if n_pos == n:
        raise ValueError(
            f"{name}: masks contain no normal pixels ({len(masks)} masks, all {n} "
            "pixels are defect)"
        )
    keys.sort()
    words = words[::-1]  # descending score
    region = words[:, _LO]
    r = _Ranking(words[:, _HI], region != 0)
    return r, region[r.pos].astype(np.intp), n_regions


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _pro_curve(r: _Ranking, region_of_pos: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    # each defect pixel of region j adds 1 / (|j| * n_regions) to PRO; cum[t] is
    # the PRO once the t highest-scoring defect pixels are above threshold
    sizes = np.bincount(region_of_pos, minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / (sizes[1:] * n_regions)
    cum = np.concatenate(([0.0], np.cumsum(weight[region_of_pos])))
    return np.concatenate(([0.0], r.fps / r.n_neg)), np.concatenate(([0.0], cum[r.tps]))


def _au_pro(r: _Ranking, region_of_pos: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    fpr, pro = _pro_curve(r, region_of_pos, n_regions)
    return min(1.0, _partial_area(fpr, pro, fpr_limit) / fpr_limit)


def _partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) for x in [0, limit]; x is nondecreasing,
    starts at 0 and ends at 1; the curve is linearly interpolated at ``limit``."""
    k = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    area = 0.5 * np.sum(np.diff(x[:k]) * (y[1:k] + y[: k - 1]))
    if x[k - 1] < limit:  # then k < len(x) because x[-1] == 1 >= limit
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_lim) * (limit - x[k - 1])
    return float(area)


def au_pro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD).

    Args:
        maps: list of float [H_i, W_i] anomaly maps (sizes may differ).
        masks: list of same-shaped arrays, nonzero = defect pixel; regions are
            the 8-connected components of each mask.
        fpr_limit: upper FPR integration limit in (0, 1].
    Returns:
        float in [0, 1]; 1.0 for a perfect detector.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    r, region_of_pos, n_regions = _pixel_ranking(maps, masks, "au_pro")
    return _au_pro(r, region_of_pos, n_regions, fpr_limit)


def pixel_metrics(maps, masks, fpr_limit: float = 0.3, curves: bool = False) -> dict:
    """Pixel-level AUROC, AP, F1-max, IoU-max and AU-PRO over all pixels of all images,
    computed from one sort.

    Args:
        maps: list of float [H_i, W_i] anomaly maps (converted to float32).
        masks: list of same-shaped arrays, nonzero = defect pixel.
        fpr_limit: AU-PRO FPR integration limit in (0, 1].
        curves: also return "roc" and "pro" ({"fpr", "tpr" | "pro"} lists, the PRO curve up to fpr_limit).
    Returns:
        {"auroc", "ap", "f1max", "iou_max", "aupro"}: floats in [0, 1] (and the curves).
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    r, region_of_pos, n_regions = _pixel_ranking(maps, masks, "pixel_metrics")
    out = {
        "auroc": r.auroc(),
        "ap": r.ap(),
        "f1max": r.f1max(),
        "iou_max": r.iou_max(),
        "aupro": _au_pro(r, region_of_pos, n_regions, fpr_limit),
    }
    if curves:
        out["roc"] = r.roc_curve()
        fpr, pro = _pro_curve(r, region_of_pos, n_regions)
        k = int(np.searchsorted(fpr, fpr_limit, side="right"))
        keep = np.unique(np.linspace(0, k - 1, min(512, k)).round().astype(int))
        out["pro"] = {"fpr": fpr[keep].tolist(), "pro": pro[keep].tolist()}
    return out
