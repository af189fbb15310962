"""Score a model of any kind on the <data>/test folders of one or more datasets and measure it.

Per dataset (category): image AUROC / AP / F1-max and pixel AUROC / AP / F1-max / IoU-max / AU-PRO
(the ADer metric set), each defect type on its own against the good images, and the rates a
quality engineer asks for at the calibrated threshold: false rejects among the good test
images and misses among the defective ones. Several datasets (a multi-class model) add their
mean. Pixel metrics are computed at each mask's original resolution.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from calibration import metrics
from calibration.dataset import evaluation_samples, read_frames, read_mask
from calibration.images import OVERLAY_JPEG, OVERLAY_SUFFIX
from calibration.maps import normalise, overlay
from calibration.model import Inspector, Model
from engines.runtimes import Deployment

Progress = Callable[..., None]
IMAGE_KEYS = ("auroc", "ap", "f1max")
PIXEL_KEYS = ("auroc", "ap", "f1max", "iou_max", "aupro")
MEAN_KEYS = tuple(f"image_{k}" for k in IMAGE_KEYS) + tuple(f"pixel_{k}" for k in PIXEL_KEYS)


def _write(path: Path, array: np.ndarray, params: list[int] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array, list(params)):
        raise OSError(f"could not write {path}")


def _rate(hits: int, n: int) -> dict:
    return {"rate": hits / n if n else None, "count": hits, "of": n}


def score_dataset(inspector: Inspector, data: Path, batch_size: int, maps_dir: Path | None,
                  scores_dir: Path | None, progress: Progress | None, category: str) -> dict:
    """Scores and verdicts of every test image of one dataset, their smoothed frame maps and masks
    (a metrics.PixelSet, which makes a map again from its canvas map where it does not keep it), and
    the scoring speed."""
    model = inspector.model
    samples = evaluation_samples(data)
    scores = np.empty(len(samples), np.float32)
    verdicts: list[str] = []
    pixels = metrics.PixelSet(name=f"pixel metrics of {category or data}")
    seconds = 0.0
    frames = read_frames([s.path for s in samples], model.geometer)
    for start in range(0, len(samples), batch_size):
        layouts, batch = zip(*[next(frames) for _ in samples[start:start + batch_size]])
        t0 = time.perf_counter()
        results = inspector.inspect(list(batch), list(layouts))
        frame_maps = [model.frame_map(r.canvas_map, r.layout) for r in results]
        decisions = [model.decide(r.canvas_map, r.layout.frame, r.score) for r in results]
        seconds += time.perf_counter() - t0
        for k, (image, r, fm, d) in enumerate(zip(batch, results, frame_maps, decisions)):
            sample = samples[start + k]
            scores[start + k] = r.score
            verdicts.append(d.verdict)
            pixels.add(fm, read_mask(sample.mask_path, fm.shape), functools.partial(model.frame_map, r.canvas_map, r.layout),
                       model.geometer.roi_frame(fm.shape))  # with an ROI, its pixels alone are scored
            if maps_dir is not None:
                heat = normalise(fm, model.thresholds["pixel"])
                _write(maps_dir / category / Path(sample.rel).with_suffix(OVERLAY_SUFFIX), overlay(image, heat),
                       OVERLAY_JPEG)
            if scores_dir is not None:
                _write(scores_dir / category / Path(sample.rel).with_suffix(".tiff"), fm)
        if progress:
            progress(f"score {category}" if category else "score", min(start + batch_size, len(samples)), len(samples))
    return {"samples": samples, "scores": scores, "verdicts": verdicts, "pixels": pixels, "seconds": seconds}


def measure(scored: dict, curves: bool = False) -> dict:
    """Metrics of one dataset from score_dataset's output."""
    samples, scores, pixels = scored["samples"], scored["scores"], scored["pixels"]
    labels = np.array([s.label for s in samples])
    types = np.array([s.rel.split("/")[0] for s in samples])
    both = 0 < labels.sum() < len(labels)  # image metrics need good and defective images
    image = metrics.image_metrics(scores, labels, curves=curves) if both else None
    good = types == "good"
    kinds = sorted(set(types) - {"good"})
    selections = [good | (types == t) for t in kinds]
    subsets = [range(len(samples))] + [np.flatnonzero(sel) for sel in selections]
    defined = [pixels.has_both(s) for s in subsets]  # pixel metrics need defect and normal pixels
    found = iter(pixels.metrics_of([s for s, d in zip(subsets, defined) if d], curves=curves))  # one walk
    pixel, *per_kind = [next(found) if d else None for d in defined]
    defect = np.array([v == "defect" for v in scored["verdicts"]])
    out = {f"image_{k}": image[k] if image else None for k in IMAGE_KEYS}
    out.update({f"pixel_{k}": pixel[k] if pixel else None for k in PIXEL_KEYS})
    out["undefined"] = [why for why, missing in (
        ("image metrics: the test set needs good and defective images (test/good and a defect folder)", not image),
        ("pixel metrics: the masks need defect pixels (and normal ones)", not pixel)) if missing]
    out.update({
        "false_reject": _rate(int((defect & (labels == 0)).sum()), int((labels == 0).sum())),
        "miss": _rate(int((~defect & (labels == 1)).sum()), int((labels == 1).sum())),
        "images_per_s": len(samples) / scored["seconds"], "n_images": len(samples),
        "n_defective": int(labels.sum()), "pixel_metrics_resolution": "original mask size",
    })
    per_type = {}
    for t, sel, px in zip(kinds, selections, per_kind):
        both = 0 < labels[sel].sum() < sel.sum()
        per_type[t] = {"image_auroc": metrics.roc_auc(scores[sel], labels[sel]) if both else None,
                       "pixel_auroc": px["auroc"] if px else None, "pixel_aupro": px["aupro"] if px else None,
                       "n_images": int((types == t).sum()),
                       "miss": _rate(int((~defect & (types == t)).sum()), int((types == t).sum()))}
    out["per_type"] = per_type
    if curves:
        out["curves"] = {"image_roc": image["roc"] if image else None, "pixel_roc": pixel["roc"] if pixel else None,
                         "pro": pixel["pro"] if pixel else None}
    return out


def evaluate(model: Model, datas: list[str | Path] | str | Path, deployment: Deployment = Deployment(),
             batch_size: int = 16, maps_dir: Path | None = None, scores_dir: Path | None = None,
             progress: Progress | None = None, curves: bool = False) -> dict:
    """{"categories": {name: metrics}, "mean": {...} (several datasets), and, for one dataset, its metrics at the top level}."""
    datas = [Path(d) for d in (datas if isinstance(datas, (list, tuple)) else [datas])]
    names = [d.name for d in datas]
    if len(set(names)) != len(names):
        names = [f"{d.parent.name}/{d.name}" for d in datas]
    if len(set(names)) != len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    single = len(datas) == 1
    result: dict = {"categories": {}}
    with Inspector(model, deployment, batch=batch_size) as inspector:
        for name, data in zip(names, datas):
            scored = score_dataset(inspector, data, batch_size, maps_dir, scores_dir, progress, "" if single else name)
            result["categories"][name] = measure(scored, curves)
    cats = list(result["categories"].values())
    result["mean"] = {k: _mean([c[k] for c in cats]) for k in MEAN_KEYS + ("images_per_s",)}
    if single:
        result.update(cats[0])
    return result


def _mean(values: list) -> float | None:
    """The mean of the categories where a metric is defined (None where it is nowhere)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def plot_curves(result: dict, path: Path) -> list[Path]:
    """One PNG per category beside `path` (<stem>-<category>-curves.png): image ROC, pixel ROC, PRO to FPR 0.3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, m in result["categories"].items():
        c = m["curves"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
        panels = [("image ROC", c["image_roc"], "tpr", "true positive rate", m["image_auroc"], 1),
                  ("pixel ROC", c["pixel_roc"], "tpr", "true positive rate", m["pixel_auroc"], 1),
                  ("PRO", c["pro"], "pro", "per-region overlap", m["pixel_aupro"], 0.3)]
        for ax, (title, curve, y, ylabel, area, xmax) in zip(axes, panels):
            if curve is None:  # undefined on this test set
                ax.set_title(f"{title}: n/a")
                ax.axis("off")
                continue
            ax.plot(curve["fpr"], curve[y], lw=1.5)
            ax.set_xlim(0, xmax)
            ax.set_ylim(0, 1.01)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {'AU-PRO' if title == 'PRO' else 'AUROC'} {area:.3f}")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{name}: false rejects {m['false_reject']['count']}/{m['false_reject']['of']}, "
                     f"misses {m['miss']['count']}/{m['miss']['of']} at the calibrated threshold")
        fig.tight_layout()
        out = path.with_name(f"{path.stem}-{name.replace('/', '_')}-curves.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written
