"""A fitted memory-bank model in use: engine + bank + thresholds -> scores and anomaly maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from calibration.artifact import load_manifest
from calibration.maps import smooth_map
from engines.banks import BankConfig, MemoryBank, image_scores
from engines.errors import ConfigError
from engines.heads import EmbeddingConfig, PatchEmbedding
from engines.runtimes import Engine, OnnxRuntimeEngine, TorchEngine, check_runtime


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """reweight_k: PatchCore image-score reweighting neighbourhood (0 = plain maximum);
    blur_sigma: Gaussian smoothing of the anomaly map, in input pixels."""

    reweight_k: int = 0
    blur_sigma: float = 4.0

    def __post_init__(self):
        if self.reweight_k < 0 or self.blur_sigma < 0:
            raise ConfigError(f"reweight_k ({self.reweight_k}) and blur_sigma ({self.blur_sigma}) must be >= 0")


def make_engine(runtime: str, embedding: EmbeddingConfig, onnx_path: Path, weights: str | None,
                threads: int | None = None, module: PatchEmbedding | None = None) -> Engine:
    """The patch-embedding engine for a runtime: onnxruntime runs onnx_path; torch runs `module`,
    or rebuilds the network from the config and weights."""
    check_runtime(runtime)
    if runtime == "torch":
        factory = (lambda: module) if module is not None else (lambda: PatchEmbedding(embedding, weights))
        return TorchEngine(factory, embedding.input_size, threads)
    return OnnxRuntimeEngine(onnx_path, embedding.input_size, threads)


def set_threads(threads: int | None) -> None:
    if threads:
        import faiss

        faiss.omp_set_num_threads(threads)


def score_features(bank: MemoryBank, features: np.ndarray, scoring: ScoringConfig,
                   exclude: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """features float32 [N, h, w, d] -> (patch maps float32 [N, h, w], image scores float32 [N])."""
    n, h, w, d = features.shape
    flat = features.reshape(n * h * w, d)
    dist, ids = bank.search(flat, 1, exclude=exclude)
    patch = dist[:, 0].reshape(n, h * w)
    images = image_scores(bank, flat.reshape(n, h * w, d), patch, ids[:, 0].reshape(n, h * w), scoring.reweight_k)
    return patch.reshape(n, h, w), images


class InspectionModel:
    """A validated model directory, ready to score uint8 [N, S, S, 3] batches."""

    def __init__(self, model_dir: str | Path, runtime: str = "onnxruntime", threads: int | None = None):
        self.dir = Path(model_dir)
        self.manifest = load_manifest(self.dir)
        self.embedding = EmbeddingConfig(**self.manifest["embedding"])
        self.scoring = ScoringConfig(**self.manifest["scoring"])
        self.bank = MemoryBank.load(self.dir / "bank.faiss", BankConfig(**self.manifest["bank"]))
        self.thresholds = json.loads((self.dir / "thresholds.json").read_text())
        self.engine = make_engine(runtime, self.embedding, self.dir / "model.onnx",
                                  self.manifest.get("weights"), threads)
        set_threads(threads)

    @property
    def input_size(self) -> int:
        return self.embedding.input_size

    def __enter__(self) -> "InspectionModel":
        self.engine.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.engine.deactivate()

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, S, S, 3] -> (patch maps float32 [N, h, w], image scores float32 [N])."""
        return score_features(self.bank, self.engine.infer(images), self.scoring)

    def smooth(self, patch_map: np.ndarray) -> np.ndarray:
        """float32 [h, w] -> float32 [S, S] smoothed anomaly map."""
        return smooth_map(patch_map, self.input_size, self.scoring.blur_sigma)
