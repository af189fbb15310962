"""Normal images -> a deployable memory-bank model directory.

Features are extracted with the same engine that will serve (ONNX Runtime by default, on
the exported graph), subsampled by greedy coreset, put in a FAISS bank, and thresholds are
calibrated on training images scored against the bank without their own patches.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from calibration.artifact import write_manifest
from calibration.coreset import greedy_coreset
from calibration.dataset import iter_batches, train_images
from calibration.maps import smooth_map
from calibration.model import Deployment, ScoringConfig, make_engine, score_features, set_threads
from engines.banks import BankConfig, MemoryBank
from engines.errors import ConfigError, LineguardError
from engines.export import export_onnx
from engines.heads import EmbeddingConfig, PatchEmbedding

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything `fit` needs besides the data; written into the manifest.

    coreset_ratio: fraction of training patches kept in the bank (1.0 keeps all);
    coreset_max: upper bound on the bank size (0: none); coreset_proj_dim: random projection
    used while picking; calib_images: at most this many training images calibrate thresholds.
    """

    embedding: EmbeddingConfig = EmbeddingConfig()
    bank: BankConfig = BankConfig()
    scoring: ScoringConfig = ScoringConfig()
    weights: str | None = None
    coreset_ratio: float = 0.1
    coreset_max: int = 8192
    coreset_proj_dim: int = 128
    calib_images: int = 100
    deployment: Deployment = Deployment()
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.deployment.runtime == "tensorrt" or self.deployment.precision != "fp32":
            raise ConfigError("fit extracts features with onnxruntime or torch at fp32 (--runtime, --device); "
                              "compile other precisions afterwards with lineguard export")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset ratio {self.coreset_ratio} must be in (0, 1], e.g. 0.1")
        if self.coreset_max < 0 or self.calib_images < 1 or self.batch_size < 1:
            raise ConfigError("coreset_max must be >= 0, calib_images and batch_size >= 1")


def _prepare_output(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise LineguardError(f"output {out} is a file; choose a directory for the model (-o DIR)")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise LineguardError(f"output {out} exists and is not a lineguard model; choose an empty or new "
                                 "directory (-o DIR) so nothing of yours is overwritten")
        for name in ("manifest.json", "model.onnx", "bank.faiss", "thresholds.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "engines", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def extract(engine, paths: list[Path], size: int, batch: int, progress: Progress | None,
            stage: str = "extract") -> np.ndarray:
    """Embeddings float32 [len(paths), h, w, d] of images read from paths."""
    out = None
    done = 0
    for images, _ in iter_batches(paths, size, batch):
        feats = engine.infer(images)
        if out is None:
            out = np.empty((len(paths),) + feats.shape[1:], np.float32)
        out[done:done + len(feats)] = feats
        done += len(feats)
        if progress:
            progress(stage, done, len(paths))
    return out


def calibrate(bank: MemoryBank, features: np.ndarray, ranges: np.ndarray, config: FitConfig,
              progress: Progress | None) -> dict:
    """Thresholds from training images scored without their own bank patches (leave one image out)."""
    n = len(features)
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(n, size=min(n, config.calib_images), replace=False))
    image_scores, pixel_max, pixel_min = [], [], []
    for k, i in enumerate(chosen):
        patch, score = score_features(bank, features[i:i + 1], config.scoring, exclude=(ranges[i], ranges[i + 1]))
        smoothed = smooth_map(patch[0], config.embedding.input_size, config.scoring.blur_sigma)
        image_scores.append(float(score[0]))
        pixel_max.append(float(smoothed.max()))
        pixel_min.append(float(smoothed.min()))
        if progress:
            progress("calibrate", k + 1, len(chosen))
    scores = np.array(image_scores)
    method = ("maximum over normal training images, each scored against the bank without its own patches "
              "(leave one image out); normalised score = 0.5 * (s - min) / (threshold - min), clipped to [0, 1]")
    return {
        "method": method,
        "images": [int(i) for i in chosen],
        "n_images": len(chosen),
        "image": {"threshold": float(scores.max()), "min": float(scores.min()), "mean": float(scores.mean()),
                  "std": float(scores.std())},
        "pixel": {"threshold": float(max(pixel_max)), "min": float(min(pixel_min))},
    }


def fit(data: str | Path, out: str | Path, config: FitConfig = FitConfig(),
        progress: Progress | None = None) -> dict:
    """Fit a model on <data>/train/good and write it to out; returns a summary dict."""
    start = time.perf_counter()
    data, out = Path(data), Path(out)
    paths = train_images(data)
    set_threads(config.deployment.threads)
    _prepare_output(out)
    module = PatchEmbedding(config.embedding, config.weights)
    size = config.embedding.input_size
    export_onnx(module, size, out / "model.onnx")
    engine = make_engine(config.deployment, out, config.embedding, config.weights, module)
    with engine:
        features = extract(engine, paths, size, config.batch_size, progress)
    t_extract = time.perf_counter() - start

    n, h, w, d = features.shape
    flat = features.reshape(n * h * w, d)
    keep = max(1, int(round(config.coreset_ratio * len(flat))))
    if config.coreset_max:
        keep = min(keep, config.coreset_max)
    t0 = time.perf_counter()
    if keep < len(flat):
        picks = np.sort(greedy_coreset(flat, keep, config.coreset_proj_dim, config.seed))
    else:
        picks = np.arange(len(flat))
    t_coreset = time.perf_counter() - t0
    if progress:
        progress("coreset", 1, 1)
    bank = MemoryBank.build(flat[picks], config.bank)
    # bank ids are sorted by image, so image i owns the contiguous id range ranges[i]:ranges[i + 1]
    ranges = np.searchsorted(picks // (h * w), np.arange(n + 1))
    thresholds = calibrate(bank, features, ranges, config, progress)
    thresholds["data"] = str(data)
    bank.save(out / "bank.faiss")
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")

    summary = {
        "train_images": n, "patches": int(len(flat)), "bank_size": bank.size, "dim": d, "grid": [h, w],
        "fit_seconds": round(time.perf_counter() - start, 2), "extract_seconds": round(t_extract, 2),
        "coreset_seconds": round(t_coreset, 2),
    }
    config_dict = dataclasses.asdict(config)
    write_manifest(out, {
        "kind": "memory_bank",
        "embedding": config_dict.pop("embedding"),
        "bank": config_dict.pop("bank"),
        "scoring": config_dict.pop("scoring"),
        "weights": config.weights,
        "feature_dim": d,
        "grid": [h, w],
        "input": {"dtype": "uint8", "layout": "NHWC", "channels": "RGB", "size": [size, size]},
        "normalisation": dataclasses.asdict(module.backbone.normalisation),
        "fit": {**config_dict, **summary, "data": str(data.resolve())},
    })
    return summary
