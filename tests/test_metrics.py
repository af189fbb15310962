import numpy as np
import pytest
import scipy.ndimage as ndi
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import cv2

from calibration.metrics import (
    PixelSet,
    au_pro,
    average_precision,
    f1_max,
    image_metrics,
    pixel_metrics,
    roc_auc,
)

RTOL = 1e-9


# ---------------------------------------------------------------- helpers


def sk_f1_max(scores, labels):
    p, r, _ = precision_recall_curve(labels, scores)
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1.max()


def ref_au_pro(maps, masks, fpr_limit, insides=None):
    """Slow, direct AU-PRO: loop over every distinct threshold (over the pixels `insides`, bool [H, W]
    each, when given: a region is its part inside)."""
    insides = insides or [np.ones(k.shape, bool) for k in masks]
    scores = np.concatenate([m[ins] for m, ins in zip(maps, insides)]).astype(np.float32)
    normal = np.concatenate([(k == 0)[ins] for k, ins in zip(masks, insides)])
    regions, offset = [], 0
    for k, ins in zip(masks, insides):
        lab, n = ndi.label((k != 0) & ins, structure=np.ones((3, 3)))
        for i in range(1, n + 1):
            region = np.zeros(scores.size, bool)
            region[offset : offset + ins.sum()] = (lab == i)[ins]
            regions.append(region)
        offset += ins.sum()

    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        above = scores >= t
        fprs.append(above[normal].mean())
        pros.append(np.mean([above[reg].mean() for reg in regions]))

    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
    return area / fpr_limit


def random_images(rng, shapes, decimals=None):
    """Random maps with several blob regions per mask; defects score higher on average."""
    maps, masks = [], []
    for h, w in shapes:
        mask = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.integers(1, 4), rng.integers(1, 4)
            mask[max(0, y - ry) : y + ry, max(0, x - rx) : x + rx] = 255
        mask[rng.random((h, w)) < 0.01] = 1  # isolated / diagonal speckles
        m = rng.random((h, w)).astype(np.float32) + 0.5 * (mask > 0)
        if decimals is not None:
            m = np.round(m, decimals)
        maps.append(m.astype(np.float32))
        masks.append(mask)
    return maps, masks


SHAPES = [(12, 15), (20, 9), (7, 7), (16, 16)]


# ---------------------------------------------------------------- 1-D metrics


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 2, 1, 0])
def test_against_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 500))
    labels = rng.random(n) < rng.uniform(0.1, 0.6)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    np.testing.assert_allclose(roc_auc(scores, labels), roc_auc_score(labels, scores), rtol=RTOL)
    np.testing.assert_allclose(
        average_precision(scores, labels), average_precision_score(labels, scores), rtol=RTOL
    )
    np.testing.assert_allclose(f1_max(scores, labels), sk_f1_max(scores, labels), rtol=RTOL)


def test_all_tied_scores():
    labels = np.array([0, 1, 0, 0, 1, 0, 1], dtype=np.int64)
    scores = np.full(labels.size, 0.7, np.float32)
    assert roc_auc(scores, labels) == pytest.approx(0.5)
    np.testing.assert_allclose(average_precision(scores, labels), average_precision_score(labels, scores), rtol=RTOL)
    np.testing.assert_allclose(f1_max(scores, labels), sk_f1_max(scores, labels), rtol=RTOL)
    np.testing.assert_allclose(f1_max(scores, labels), 2 * 3 / (3 + 7), rtol=RTOL)


def test_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_metrics(scores, labels) == {"auroc": 1.0, "ap": 1.0, "f1max": 1.0}
    assert roc_auc(-scores, labels) == 0.0


def test_label_dtypes_and_float32():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300), 1).astype(np.float32)
    ref = roc_auc_score(labels, scores)
    for lab in (labels, labels.astype(np.uint8), labels.astype(float)):
        np.testing.assert_allclose(roc_auc(scores, lab), ref, rtol=RTOL)


def test_image_metrics_consistent():
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + 0.3 * labels, 1)
    out = image_metrics(scores, labels)
    assert set(out) == {"auroc", "ap", "f1max"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    assert out["auroc"] == roc_auc(scores, labels)
    assert out["ap"] == average_precision(scores, labels)
    assert out["f1max"] == f1_max(scores, labels)


# ---------------------------------------------------------------- AU-PRO / pixel metrics


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_au_pro_against_reference(seed, decimals, fpr_limit):
    rng = np.random.default_rng(100 + seed)
    maps, masks = random_images(rng, SHAPES, decimals)
    np.testing.assert_allclose(
        au_pro(maps, masks, fpr_limit), ref_au_pro(maps, masks, fpr_limit), rtol=RTOL
    )


def test_au_pro_limit_hits_curve_point_exactly():
    # 10 normal pixels: FPR 0.3 is reached exactly, with a vertical (tied) step there
    maps = [np.array([[0.9, 0.9, 0.9, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.9]], np.float32)]
    masks = [np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]], np.uint8)]
    for lim in (0.3, 0.25, 0.35):
        np.testing.assert_allclose(au_pro(maps, masks, lim), ref_au_pro(maps, masks, lim), rtol=RTOL)


def test_au_pro_diagonal_regions_are_connected():
    mask = np.eye(4, dtype=np.uint8)  # one 8-connected region, four 4-connected ones
    mask[0, 3] = 1  # a second region
    m = np.zeros((4, 4), np.float32)
    m[0, 0] = 1.0  # only 1 of 4 pixels of the diagonal region is detected
    m[0, 3] = 1.0  # the single-pixel region is fully detected
    # at FPR 0: PRO = (1/4 + 1) / 2 = 0.625 with 8-connectivity (4-connectivity: 2/5 = 0.4)
    np.testing.assert_allclose(au_pro([m], [mask], 1e-9), 0.625, rtol=1e-6)
    np.testing.assert_allclose(au_pro([m], [mask], 0.3), ref_au_pro([m], [mask], 0.3), rtol=RTOL)


def test_au_pro_perfect_and_inverted():
    rng = np.random.default_rng(3)
    maps, masks = random_images(rng, SHAPES)
    perfect = [np.where(k > 0, 1.0 + r, r).astype(np.float32) for r, k in zip(maps, masks)]
    inverted = [-p for p in perfect]
    assert au_pro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert au_pro(perfect, masks, 0.01) == pytest.approx(1.0, abs=1e-12)
    assert au_pro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    out = pixel_metrics(perfect, masks)
    assert out == pytest.approx({"auroc": 1.0, "ap": 1.0, "f1max": 1.0, "iou_max": 1.0, "aupro": 1.0})


def test_pixel_negative_scores_signed_zero_and_inf():
    # the pixel path sorts float32 bit patterns: check the ordering edge cases
    rng = np.random.default_rng(5)
    maps, masks = random_images(rng, SHAPES, decimals=1)
    values = np.array([-np.inf, -1e30, -2.5, -1e-45, -0.0, 0.0, 1e-45, 0.5, 3e38, np.inf], np.float32)
    maps = [(m - 0.7).astype(np.float32) for m in maps]  # negative and positive scores
    for m in maps:
        m.ravel()[rng.integers(0, m.size, 15)] = rng.choice(values, 15)
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([k.ravel() != 0 for k in masks])
    out = pixel_metrics(maps, masks)
    assert out["auroc"] == roc_auc(scores, labels)  # argsort path, handles inf
    assert out["ap"] == pytest.approx(average_precision(scores, labels), rel=RTOL)
    assert out["f1max"] == f1_max(scores, labels)
    np.testing.assert_allclose(out["aupro"], ref_au_pro(maps, masks, 0.3), rtol=RTOL)
    finite = [np.clip(m, -1e30, 3e38) for m in maps]  # sklearn rejects inf
    np.testing.assert_allclose(
        pixel_metrics(finite, masks)["auroc"],
        roc_auc_score(labels, np.concatenate([m.ravel() for m in finite])),
        rtol=RTOL,
    )


def test_pixel_float64_maps_are_scored_as_float32():
    rng = np.random.default_rng(9)
    maps, masks = random_images(rng, SHAPES)
    maps64 = [m.astype(np.float64) + 1e-12 * rng.random(m.shape) for m in maps]
    assert pixel_metrics(maps64, masks) == pixel_metrics(maps, masks)


@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_metrics_consistent(decimals):
    rng = np.random.default_rng(11)
    maps, masks = random_images(rng, SHAPES, decimals)
    out = pixel_metrics(maps, masks, fpr_limit=0.2)
    assert set(out) == {"auroc", "ap", "f1max", "iou_max", "aupro"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([k.ravel() != 0 for k in masks])
    np.testing.assert_allclose(out["auroc"], roc_auc_score(labels, scores), rtol=RTOL)
    np.testing.assert_allclose(out["ap"], average_precision_score(labels, scores), rtol=RTOL)
    np.testing.assert_allclose(out["f1max"], sk_f1_max(scores, labels), rtol=RTOL)
    assert out["aupro"] == au_pro(maps, masks, fpr_limit=0.2)
    assert out["auroc"] == roc_auc(scores, labels)
    np.testing.assert_allclose(out["iou_max"], sk_iou_max(scores, labels), rtol=RTOL)


def sk_iou_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Independent IoU-max: sklearn's Jaccard score of `scores >= t` at every distinct score t."""
    from sklearn.metrics import jaccard_score

    return max(jaccard_score(labels, scores >= t) for t in np.unique(scores))


def test_iou_max_small_case_by_hand():
    # 4 defect pixels scored 0.9, 0.8, 0.3, 0.2 among normal ones at 0.7, 0.1: cutting at >= 0.8 gives
    # IoU 2 / 4, at >= 0.7 2 / 5, at >= 0.3 3 / 5, at >= 0.2 4 / 5 (the best), at >= 0.1 4 / 6
    maps = [np.array([[0.9, 0.8, 0.3, 0.2, 0.7, 0.1]], np.float32)]
    masks = [np.array([[1, 1, 1, 1, 0, 0]], np.uint8)]
    assert pixel_metrics(maps, masks)["iou_max"] == pytest.approx(0.8)


def test_curves_are_the_metrics_curves():
    rng = np.random.default_rng(12)
    maps, masks = random_images(rng, SHAPES)
    out = pixel_metrics(maps, masks, curves=True)
    roc, pro = out["roc"], out["pro"]
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    assert max(pro["fpr"]) <= 0.3 and np.all(np.diff(pro["pro"]) >= 0)
    # the plotted ROC, thinned, still integrates to about the AUROC
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(out["auroc"], abs=0.01)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [roc_auc, average_precision, f1_max, image_metrics])
def test_one_class_raises(fn):
    with pytest.raises(ValueError, match="only one class"):
        fn(np.arange(5.0), np.zeros(5))
    with pytest.raises(ValueError, match="only one class"):
        fn(np.arange(5.0), np.ones(5, bool))


@pytest.mark.parametrize("fn", [roc_auc, image_metrics])
def test_bad_inputs_raise(fn):
    with pytest.raises(ValueError, match="shapes"):
        fn(np.arange(5.0), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        fn(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="0/1"):
        fn(np.array([0.1, 0.2]), np.array([0, 2]))


@pytest.mark.parametrize("fn", [au_pro, pixel_metrics])
def test_pixel_errors(fn):
    m = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="no defect"):
        fn([m, m], [np.zeros((5, 6)), np.zeros((5, 6))])
    with pytest.raises(ValueError, match="no normal"):
        fn([m], [np.ones((5, 6))])
    with pytest.raises(ValueError, match="shapes"):
        fn([m], [np.ones((6, 5))])
    with pytest.raises(ValueError, match="maps and masks"):
        fn([m, m], [np.ones((5, 6))])
    with pytest.raises(ValueError, match="maps and masks"):
        fn([], [])
    with pytest.raises(ValueError, match="fpr_limit"):
        fn([m], [np.eye(5, 6)], fpr_limit=0.0)


# ---------------------------------------------------------------- bounded memory (PixelSet)


def test_chunked_ranking_equals_one_sort():
    """Chunks of a few pixels, every top-16 bin split further, tied keys counted alone, nothing
    cached (each map made again per pass): the same metrics as one chunk of every pixel, and
    sklearn's."""
    rng = np.random.default_rng(21)
    maps, masks = random_images(rng, SHAPES * 3, decimals=1)  # heavy ties: 11 distinct values
    maps = [m + np.float32(1e-3) * (i % 3) for i, m in enumerate(maps)]  # ... in 33 keys, some in one bin
    whole = pixel_metrics(maps, masks, curves=True)
    made = []
    for chunk, cache in [(40, 0), (7, 10**9), (1, 0)]:
        pixels = PixelSet(chunk_pixels=chunk, cache_pixels=cache)
        for i, (m, k) in enumerate(zip(maps, masks)):
            pixels.add(m, k, remake=lambda i=i: made.append(i) or maps[i])
        assert len(pixels._plan(range(len(pixels)))) > 10  # it did run in many chunks
        out = pixels.metrics(curves=True)
        assert {k: out[k] for k in ("auroc", "f1max", "iou_max")} == {k: whole[k] for k in ("auroc", "f1max", "iou_max")}
        assert out["ap"] == pytest.approx(whole["ap"], rel=RTOL) and out["aupro"] == pytest.approx(whole["aupro"], rel=RTOL)
        assert out["roc"] == whole["roc"] and out["pro"]["fpr"] == whole["pro"]["fpr"]
    assert made  # uncached maps were made again
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([k.ravel() != 0 for k in masks])
    np.testing.assert_allclose(out["auroc"], roc_auc_score(labels, scores), rtol=RTOL)
    np.testing.assert_allclose(out["ap"], average_precision_score(labels, scores), rtol=RTOL)
    np.testing.assert_allclose(out["aupro"], ref_au_pro(maps, masks, 0.3), rtol=RTOL)


def test_pixels_outside_a_region_of_interest_do_not_count():
    """eval of an ROI model scores the pixels inside alone: the same metrics as sklearn and the reference
    AU-PRO on those pixels (a region cut by the ROI is its part inside), cached or made again."""
    rng = np.random.default_rng(23)
    maps, masks = random_images(rng, SHAPES, decimals=2)
    insides = [np.zeros(m.shape, bool) for m in maps]
    for ins in insides:
        ins[:, : ins.shape[1] * 2 // 3] = True  # the left two thirds
    for chunk, cache in [(1 << 26, 10**9), (9, 0)]:
        pixels = PixelSet(chunk_pixels=chunk, cache_pixels=cache)
        for m, k, ins in zip(maps, masks, insides):
            pixels.add(m, k, remake=lambda m=m: m, inside=ins)
        out = pixels.metrics()
        scores = np.concatenate([m[ins] for m, ins in zip(maps, insides)])
        labels = np.concatenate([k[ins] != 0 for k, ins in zip(masks, insides)])
        np.testing.assert_allclose(out["auroc"], roc_auc_score(labels, scores), rtol=RTOL)
        np.testing.assert_allclose(out["ap"], average_precision_score(labels, scores), rtol=RTOL)
        np.testing.assert_allclose(out["aupro"], ref_au_pro(maps, masks, 0.3, insides), rtol=RTOL)
    whole = pixel_metrics(maps, masks)
    assert whole["auroc"] != pytest.approx(out["auroc"], rel=1e-6)  # the outside would have counted


def test_pixel_set_subsets_are_their_own_metrics():
    rng = np.random.default_rng(22)
    maps, masks = random_images(rng, SHAPES)
    pixels = PixelSet(chunk_pixels=50, cache_pixels=100)
    for m, k in zip(maps, masks):
        pixels.add(m, k)
    for subset in ([0], [1, 3], [0, 2, 3]):
        expected = pixel_metrics([maps[i] for i in subset], [masks[i] for i in subset])
        assert pixels.metrics(subset) == pytest.approx(expected, rel=RTOL)


def test_subsets_in_one_walk_equal_their_own_metrics_and_make_each_map_once_a_chunk():
    """Several subsets at once (eval: all, and good + each type) over chunks of the union: a subset
    whose images hold no key of a chunk (its scores lie elsewhere) or none of a tied key gets no point
    there, and every subset's metrics equal its own; an uncached map is made once a chunk, not once a
    chunk for each subset."""
    rng = np.random.default_rng(23)
    maps, masks = random_images(rng, SHAPES * 2, decimals=1)
    maps = [m + np.float32(5.0) * (i % 2) for i, m in enumerate(maps)]  # odd images score far above even ones
    subsets = [list(range(len(maps))), [0, 2, 4], [1, 3], [0, 1, 5], [2]]
    subsets = [s for s in subsets if any(masks[i].any() for i in s) and not all(masks[i].all() for i in s)]
    made = []
    pixels = PixelSet(chunk_pixels=9, cache_pixels=0)
    for i, (m, k) in enumerate(zip(maps, masks)):
        pixels.add(m, k, remake=lambda i=i: made.append(i) or maps[i])
    chunks = len(pixels._plan(range(len(maps))))
    made.clear()
    together = pixels.metrics_of(subsets, curves=True)
    assert chunks > 10 and len(made) <= len(maps) * (chunks + 1)  # the + 1: the plan's pass over split bins
    in_one_walk = len(made)
    made.clear()
    for subset in subsets:
        pixels.metrics(subset)
    assert len(made) > 1.5 * in_one_walk  # one subset after another makes them again for each
    for subset, out in zip(subsets, together):
        alone = pixel_metrics([maps[i] for i in subset], [masks[i] for i in subset], curves=True)
        assert {k: out[k] for k in ("auroc", "f1max", "iou_max")} == {k: alone[k] for k in ("auroc", "f1max", "iou_max")}
        assert out["ap"] == pytest.approx(alone["ap"], rel=RTOL) and out["aupro"] == pytest.approx(alone["aupro"], rel=RTOL)
        assert out["roc"] == alone["roc"] and out["pro"]["fpr"] == alone["pro"]["fpr"]


def test_pixel_set_memory_is_bounded():
    """12 maps of a million pixels, made on demand: the metrics hold a few chunks' worth of keys, not
    every pixel (one sort of all of them took 328 MB here), and equal the one-sort result."""
    import tracemalloc

    def frame_map(i):
        small = np.random.default_rng(i).random((24, 30)).astype(np.float32)
        return cv2.resize(small, (1250, 800), interpolation=cv2.INTER_LINEAR)

    masks = []
    for i in range(12):
        mask = np.zeros((800, 1250), np.uint8)
        cv2.circle(mask, (100 * i + 50, 60 * i + 40), 10 + 5 * i, 255, -1)
        masks.append(mask)
    tracemalloc.start()
    try:
        pixels = PixelSet(chunk_pixels=1 << 20, cache_pixels=0)
        for i, mask in enumerate(masks):
            pixels.add(frame_map(i), mask, remake=lambda i=i: frame_map(i))
        out = pixels.metrics()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 80e6, f"peak {peak / 1e6:.0f} MB"
    assert out == pytest.approx(pixel_metrics([frame_map(i) for i in range(12)], masks), rel=RTOL)


def test_pixel_set_refuses_a_map_made_again_at_another_size():
    m, k = np.random.default_rng(0).random((5, 6)).astype(np.float32), np.eye(5, 6)
    pixels = PixelSet(cache_pixels=0)
    pixels.add(m, k, remake=lambda: m[:4])
    with pytest.raises(ValueError, match="made again"):
        pixels.metrics()
