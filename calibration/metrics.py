"""Exact anomaly-detection metrics: AUROC, AP, F1-max and AU-PRO.

All curves are exact (every distinct score is a threshold, tied scores move
together), built from counts at each distinct score in descending order, the way
scikit-learn's ``_binary_clf_curve`` does it, so ``roc_auc``, ``average_precision``
and ``f1_max`` agree with ``sklearn.metrics`` including tie handling.  The pixel
metrics (`PixelSet`) rank all pixels of all images in bounded memory, in chunks of
the score range, and give what one sort of every pixel would.  Only numpy and
OpenCV (8-connected components for AU-PRO) are used; scikit-learn is test-only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

__all__ = [
    "roc_auc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "pixel_metrics",
    "au_pro",
    "PixelSet",
]


# --------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------


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


def _run_ends(s: np.ndarray) -> np.ndarray:
    """Sorted values [N] -> the last index of each run of equal values, int64 [D], ascending."""
    return np.flatnonzero(np.append(s[1:] != s[:-1], True))


def _rank(scores, labels, name: str) -> dict:
    """{"auroc", "ap", "f1max", "roc"} of scores [N] against labels [N], from one descending sort."""
    scores, labels = _check_scores_labels(scores, labels, name)
    order = np.argsort(scores)[::-1]
    s, y = scores[order], labels[order]
    last = _run_ends(s)
    tps = np.cumsum(y, dtype=np.int64)[last]
    pos = np.diff(tps, prepend=0)
    curve = _Curve(int(tps[-1]), len(y) - int(tps[-1]), fpr_limit=1.0)
    curve.add(np.diff(last, prepend=-1) - pos, pos, np.zeros(len(last)))
    return curve.result(curves=True)


# --------------------------------------------------------------------------
# image-level (1-D) metrics
# --------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: float array [N], higher = more anomalous.
        labels: bool or 0/1 array [N], 1 = anomalous.
    """
    return _rank(scores, labels, "roc_auc")["auroc"]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (equals ``sklearn.metrics.average_precision_score``).

    Args:
        scores: float array [N], higher = more anomalous.
        labels: bool or 0/1 array [N], 1 = anomalous.
    """
    return _rank(scores, labels, "average_precision")["ap"]


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Maximum F1 over all points of the exact precision-recall curve.

    Args:
        scores: float array [N], higher = more anomalous.
        labels: bool or 0/1 array [N], 1 = anomalous.
    """
    return _rank(scores, labels, "f1_max")["f1max"]


def image_metrics(scores, labels, curves: bool = False) -> dict:
    """AUROC, AP and F1-max from one sort.

    Args:
        scores: float array [N]; labels: bool or 0/1 array [N], 1 = anomalous.
        curves: also return "roc": {"fpr", "tpr"} lists.
    Returns:
        {"auroc", "ap", "f1max"}: floats in [0, 1] (and the curve).
    """
    r = _rank(scores, labels, "image_metrics")
    return {k: r[k] for k in ("auroc", "ap", "f1max") + (("roc",) if curves else ())}


# --------------------------------------------------------------------------
# pixel-level metrics and AU-PRO
# --------------------------------------------------------------------------

# Pixels are ranked by their float32 score mapped to an order-preserving uint32 key. A PixelSet holds
# each image's keys while they fit in `cache_pixels` (and makes the rest again from the image's map
# when they are needed), each image's defect pixels (sparse) and a histogram of its keys' top 16 bits.
# Metrics walk the key space from the highest key down in chunks of at most `chunk_pixels` pixels
# (planned from the histograms; a top-16 bin too large for one chunk is split on its low 16 bits,
# and one key value held by more pixels is counted without gathering them), and fold each chunk's
# counts at each distinct key into running sums. Memory is bounded by the two budgets, whatever
# the number and size of the images; the result equals one global sort's.
CHUNK_PIXELS = 1 << 26  # at most this many pixels' keys gathered and sorted at once (2 x 256 MiB of uint32)
CACHE_PIXELS = 1 << 28  # keys kept between passes (1 GiB); beyond, an image's map is made again per chunk
_ALL_KEYS = 1 << 32
BLOCK = 1 << 18  # pixels counted and folded at a time (bounds the folding's float64 temporaries)


def _ordered_bits(m: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint32 [n] whose unsigned order is the float order (a new array)."""
    u = (m + np.float32(0)).view(np.uint32)  # a copy; adding +0 turns -0.0 into +0.0
    negative = u >= 0x80000000
    if negative.any():
        u[negative] = ~u[negative]
        u[~negative] |= np.uint32(0x80000000)
    else:  # maps are mostly >= 0: one pass
        u |= np.uint32(0x80000000)
    return u


class _Image:
    """One image of a PixelSet: its keys (or how to make them), defect pixels and key histogram."""

    __slots__ = ("shape", "inside", "size", "keys", "source", "defects", "regions", "sizes", "bins", "counts")

    def __init__(self, shape, inside, keys, source, defects, regions, sizes, bins, counts):
        self.shape = shape  # (H, W)
        self.inside = inside  # flat indices of the pixels that count, int [n] ascending, or None: all
        self.size = shape[0] * shape[1] if inside is None else len(inside)
        self.keys = keys  # uint32 [size] or None (not cached: `source` makes the map again)
        self.source = source  # () -> float [H, W], or None when the keys are cached
        self.defects = defects  # indices into the keys of the defect pixels, int32 [p] (int64 past 2 ** 31)
        self.regions = regions  # their 8-connected region, 0-based within the image, int32 [p]
        self.sizes = sizes  # pixels per region, int64 [c]
        self.bins = bins  # the top-16-bit values of its keys present, int64 [b], ascending
        self.counts = counts  # pixels per such value, int64 [b]


class PixelSet:
    """Score maps and defect masks of many images, for exact pixel metrics in bounded memory."""

    def __init__(self, chunk_pixels: int = CHUNK_PIXELS, cache_pixels: int = CACHE_PIXELS, name: str = "pixel_metrics"):
        if chunk_pixels < 1 or cache_pixels < 0:
            raise ValueError(f"chunk_pixels must be >= 1 and cache_pixels >= 0, got {chunk_pixels}, {cache_pixels}")
        self.chunk_pixels, self.cache_pixels, self.name = chunk_pixels, cache_pixels, name
        self.images: list[_Image] = []
        self._cached = 0

    def __len__(self) -> int:
        return len(self.images)

    def add(self, score_map, mask, remake: Callable[[], np.ndarray] | None = None,
            inside: np.ndarray | None = None) -> None:
        """score_map: float [H, W] (scored as float32), higher = more anomalous; mask: [H, W], nonzero =
        defect pixel (8-connected regions). remake: () -> the same map, called where the image's keys do
        not fit the cache (None: the set keeps a reference to `score_map` instead). inside: bool [H, W],
        the pixels that count (a region of interest; None: all); a defect region is its part inside."""
        i = len(self.images)
        if np.ndim(score_map) != 2 or np.shape(score_map) != np.shape(mask) or (
                inside is not None and np.shape(inside) != np.shape(mask)):
            raise ValueError(f"{self.name}: map {i}, mask {i} (and inside) must be 2-D with equal shapes, "
                             f"got {np.shape(score_map)}, {np.shape(mask)} and {np.shape(inside)}")
        shape = tuple(np.shape(score_map))
        defect = np.asarray(mask) != 0
        if inside is not None:
            defect &= np.asarray(inside, bool)
            inside = np.flatnonzero(inside)
        keys = self._keys_of(score_map, i, inside)
        count, labels = cv2.connectedComponents(defect.astype(np.uint8), connectivity=8)
        labels = labels.ravel()
        defects = np.flatnonzero(labels)
        regions = labels[defects] - 1
        if inside is not None:  # into the keys of the pixels inside
            defects = np.searchsorted(inside, defects)
        defects = defects.astype(np.int32 if labels.size < 1 << 31 else np.int64)
        sizes = np.bincount(regions, minlength=count - 1).astype(np.int64)
        hist = np.bincount(keys >> 16, minlength=1 << 16)
        bins = np.flatnonzero(hist)
        cached = self._cached + keys.size <= self.cache_pixels
        if cached:
            self._cached += keys.size
        source = None if cached else (remake or (lambda m=score_map: m))
        self.images.append(_Image(shape, inside, keys if cached else None, source, defects, regions, sizes, bins,
                                  hist[bins].astype(np.int64)))

    def _keys_of(self, score_map, i: int, inside: np.ndarray | None = None) -> np.ndarray:
        m = np.asarray(score_map, dtype=np.float32).ravel()
        if inside is not None:
            m = m[inside]
        if np.isnan(m).any():
            raise ValueError(f"{self.name}: map {i} contains NaN")
        return _ordered_bits(m)

    def _keys(self, i: int) -> np.ndarray:
        image = self.images[i]
        if image.keys is not None:
            return image.keys
        m = image.source()
        if np.shape(m) != image.shape:
            raise ValueError(f"{self.name}: map {i} was {image.shape} when added and is {np.shape(m)} when made again")
        return self._keys_of(m, i, image.inside)

    def metrics(self, images: Sequence[int] | None = None, fpr_limit: float = 0.3, curves: bool = False) -> dict:
        """Pixel AUROC, AP, F1-max, IoU-max and AU-PRO (to `fpr_limit`) over all pixels of `images`
        (indices; None: all), exactly as one sort of all their pixels would give them.
        curves: also "roc" {"fpr", "tpr"} and "pro" {"fpr", "pro"} (to fpr_limit), at most about 512
        points each, for plots."""
        return self.metrics_of([range(len(self.images)) if images is None else images], fpr_limit, curves)[0]

    def has_both(self, images: Sequence[int]) -> bool:
        """Whether these images' masks hold defect and normal pixels, which every pixel metric needs."""
        n = sum(self.images[i].size for i in images)
        n_pos = sum(len(self.images[i].defects) for i in images)
        return 0 < n_pos < n

    def metrics_of(self, subsets: Sequence[Sequence[int]], fpr_limit: float = 0.3, curves: bool = False) -> list[dict]:
        """`metrics` of each subset of the images (eval: all, and good + each defect type), in one walk
        over the key range: a map not cached is made again once a chunk for every subset, not once a
        chunk for each."""
        fpr_limit = _check_fpr_limit(fpr_limit)
        subsets = [list(images) for images in subsets]
        sums = []  # per subset: its running curve and its number of defect regions
        for images in subsets:
            if not len(images):
                raise ValueError(f"{self.name}: need equally many maps and masks (at least one), got none")
            n = sum(self.images[i].size for i in images)
            n_pos = sum(len(self.images[i].defects) for i in images)
            if n_pos == 0:
                raise ValueError(f"{self.name}: masks contain no defect pixels ({len(images)} masks, {n} pixels, "
                                 "0 defect regions)")
            if n_pos == n:
                raise ValueError(f"{self.name}: masks contain no normal pixels ({len(images)} masks, all {n} "
                                 "pixels are defect)")
            sums.append((_Curve(n_pos, n - n_pos, fpr_limit), sum(len(self.images[i].sizes) for i in images)))
        union = sorted(set().union(*subsets))
        for lo, hi in self._plan(union):
            parts = {i: self._part(i, lo, hi) for i in union}
            for images, (curve, n_regions) in zip(subsets, sums):
                self._fold(curve, [parts[i] for i in images], lo, hi, n_regions)
        return [curve.result(curves) for curve, _ in sums]

    def _plan(self, images: Sequence[int]) -> list[tuple[int, int]]:
        """Key ranges [lo, hi), highest first, covering every key of `images`, each of at most
        chunk_pixels pixels or a single key value."""
        hist = np.zeros(1 << 16, np.int64)
        for i in images:
            np.add.at(hist, self.images[i].bins, self.images[i].counts)
        if hist.sum() <= self.chunk_pixels:
            return [(0, _ALL_KEYS)]
        big = np.flatnonzero(hist > self.chunk_pixels)
        fine = {int(b): np.zeros(1 << 16, np.int64) for b in big}
        if fine:  # one more pass: the low 16 bits of the keys in bins too large for a chunk
            for i in images:
                keys = self._keys(i)
                top = keys >> 16
                for b, low in fine.items():
                    low += np.bincount(keys[top == b] & 0xFFFF, minlength=1 << 16)
        leaves = []  # (lo, hi, pixels), highest first
        for b in np.flatnonzero(hist)[::-1]:
            b = int(b)
            if b in fine:
                low = fine[b]
                leaves += [((b << 16) | int(v), ((b << 16) | int(v)) + 1, int(low[v])) for v in np.flatnonzero(low)[::-1]]
            else:
                leaves.append((b << 16, (b + 1) << 16, int(hist[b])))
        chunks: list[list[int]] = []
        for lo, hi, count in leaves:
            if chunks and chunks[-1][2] + count <= self.chunk_pixels:
                chunks[-1][0], chunks[-1][2] = lo, chunks[-1][2] + count
            else:
                chunks.append([lo, hi, count])
        return [(lo, hi) for lo, hi, _ in chunks]

    def _part(self, i: int, lo: int, hi: int) -> tuple:
        """Image i's pixels with keys in [lo, hi): (its keys, or for a single key value how many pixels
        hold it; its defect pixels' keys; the sizes of their regions)."""
        keys, image = self._keys(i), self.images[i]
        dk = keys[image.defects]
        if (lo, hi) == (0, _ALL_KEYS):
            return keys, dk, image.sizes[image.regions]
        inside = _within(dk, lo, hi)
        held = int(np.count_nonzero(keys == lo)) if hi - lo == 1 else keys[_within(keys, lo, hi)]
        return held, dk[inside], image.sizes[image.regions[inside]]

    def _fold(self, curve: "_Curve", parts: list[tuple], lo: int, hi: int, n_regions: int) -> None:
        """Fold the pixels of `parts` (`_part` of each image, keys in [lo, hi)) into `curve`, highest key
        first: gathered and sorted, then counted at each distinct key a block of about BLOCK pixels at a
        time (a single key value: counted in place). A defect pixel's PRO weight: 1 / (its region's size x
        n_regions)."""
        defect_keys = np.concatenate([dk for _, dk, _ in parts])
        defect_weights = 1.0 / (np.concatenate([sizes for _, _, sizes in parts]) * n_regions)
        if hi - lo == 1:
            held = sum(held for held, _, _ in parts)
            if held:  # a key of the union's chunk that none of these images holds adds no point
                pos = len(defect_keys)
                curve.add(np.array([held - pos]), np.array([pos]), np.array([defect_weights.sum()]))
            return
        every = np.concatenate([held for held, _, _ in parts]) if len(parts) > 1 else parts[0][0].copy()
        every.sort()
        order = np.argsort(defect_keys, kind="stable")
        defect_keys, defect_weights = defect_keys[order], defect_weights[order]
        end = len(every)
        while end:  # blocks of whole runs of equal keys, from the top
            start = int(np.searchsorted(every[:end], every[max(0, end - BLOCK)], side="left"))
            block = every[start:end]
            last = _run_ends(block)
            distinct, counts = block[last], np.diff(last, prepend=-1)
            a = np.searchsorted(defect_keys, block[0], side="left")
            b = np.searchsorted(defect_keys, block[-1], side="right")
            at = np.searchsorted(distinct, defect_keys[a:b])
            pos = np.bincount(at, minlength=len(distinct))
            pro = np.bincount(at, weights=defect_weights[a:b], minlength=len(distinct))
            curve.add((counts - pos)[::-1], pos[::-1], pro[::-1])
            end = start


def _within(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """bool [n]: keys uint32 [n] in [lo, hi) (hi up to 2 ** 32)."""
    inside = keys >= lo
    if hi < _ALL_KEYS:
        inside &= keys < hi
    return inside


class _Curve:
    """ROC and PRO sums folded in over distinct scores, highest first (each fold one chunk)."""

    def __init__(self, n_pos: int, n_neg: int, fpr_limit: float, points: int = 512):
        self.n_pos, self.n_neg, self.fpr_limit, self.points = n_pos, n_neg, fpr_limit, points
        self.tp = self.fp = 0
        self.pro = 0.0
        self.area2 = 0  # twice the ROC area in integer counts (exact)
        self.ap = self.f1 = self.iou = 0.0
        self.pro_area, self.pro_done = 0.0, False
        self.roc, self.pro_curve = [(0.0, 0.0)], [(0.0, 0.0)]

    def add(self, neg: np.ndarray, pos: np.ndarray, weight: np.ndarray) -> None:
        tps, fps = self.tp + np.cumsum(pos), self.fp + np.cumsum(neg)
        before = np.concatenate(([self.tp], tps[:-1]))
        self.area2 += int(np.sum(neg * (tps + before)))
        self.ap += float(np.dot(pos, tps / (tps + fps)))
        self.f1 = max(self.f1, float(np.max(2.0 * tps / (self.n_pos + tps + fps))))
        self.iou = max(self.iou, float(np.max(tps / (self.n_pos + fps))))
        pro = self.pro + np.cumsum(weight)
        fpr, tpr = fps / self.n_neg, tps / self.n_pos
        self._thin(self.roc, fpr, tpr, 1.0)
        if not self.pro_done:
            self._pro(np.concatenate(([self.fp / self.n_neg], fpr)), np.concatenate(([self.pro], pro)))
        self.tp, self.fp, self.pro = int(tps[-1]), int(fps[-1]), float(pro[-1])

    def _pro(self, x: np.ndarray, y: np.ndarray) -> None:
        """Trapezoid area under (x, y) up to fpr_limit, the curve interpolated there; x[0], y[0]: the last point."""
        k = int(np.searchsorted(x, self.fpr_limit, side="right"))  # points with x <= limit
        self.pro_area += 0.5 * float(np.sum(np.diff(x[:k]) * (y[1:k] + y[:k - 1])))
        self._thin(self.pro_curve, x[1:k], y[1:k], self.fpr_limit)
        if k < len(x):
            if x[k - 1] < self.fpr_limit:
                y_lim = y[k - 1] + (y[k] - y[k - 1]) * (self.fpr_limit - x[k - 1]) / (x[k] - x[k - 1])
                self.pro_area += 0.5 * (y[k - 1] + y_lim) * (self.fpr_limit - x[k - 1])
            self.pro_done = True

    def _thin(self, kept: list, x: np.ndarray, y: np.ndarray, x_end: float) -> None:
        """Append to `kept` (points (x, y) so far) the points of a nondecreasing curve where x / x_end + y
        (0 to 2) enters a new step of 2 / points: at most about `points` points, dense where the curve moves."""
        if not len(x):
            return
        steps = np.floor((np.concatenate(([kept[-1][0]], x)) / x_end + np.concatenate(([kept[-1][1]], y)))
                         * (self.points / 2))
        new = np.flatnonzero(steps[1:] != steps[:-1])
        kept += zip(x[new].tolist(), y[new].tolist())

    def result(self, curves: bool) -> dict:
        out = {"auroc": float(self.area2 / (2.0 * self.n_pos * self.n_neg)), "ap": self.ap / self.n_pos,
               "f1max": self.f1, "iou_max": self.iou, "aupro": min(1.0, float(self.pro_area) / self.fpr_limit)}
        if curves:
            roc = self.roc if self.roc[-1] == (1.0, 1.0) else self.roc + [(1.0, 1.0)]
            out["roc"] = {"fpr": [p[0] for p in roc], "tpr": [p[1] for p in roc]}
            out["pro"] = {"fpr": [p[0] for p in self.pro_curve], "pro": [p[1] for p in self.pro_curve]}
        return out


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _pixel_set(maps, masks, name: str) -> PixelSet:
    maps, masks = list(maps), list(masks)
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"{name}: need equally many maps and masks (at least one), "
                         f"got {len(maps)} maps and {len(masks)} masks")
    pixels = PixelSet(name=name)
    for m, k in zip(maps, masks):
        pixels.add(m, k)
    return pixels


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
    return _pixel_set(maps, masks, "au_pro").metrics(fpr_limit=fpr_limit)["aupro"]


def pixel_metrics(maps, masks, fpr_limit: float = 0.3, curves: bool = False) -> dict:
    """Pixel-level AUROC, AP, F1-max, IoU-max and AU-PRO over all pixels of all images (`PixelSet`,
    which also bounds the memory of many large maps).

    Args:
        maps: list of float [H_i, W_i] anomaly maps (converted to float32).
        masks: list of same-shaped arrays, nonzero = defect pixel.
        fpr_limit: AU-PRO FPR integration limit in (0, 1].
        curves: also return "roc" and "pro" ({"fpr", "tpr" | "pro"} lists, the PRO curve up to fpr_limit).
    Returns:
        {"auroc", "ap", "f1max", "iou_max", "aupro"}: floats in [0, 1] (and the curves).
    """
    return _pixel_set(maps, masks, "pixel_metrics").metrics(fpr_limit=fpr_limit, curves=curves)
