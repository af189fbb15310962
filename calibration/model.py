"""A fitted memory-bank model in use: engine + bank + thresholds -> scores and anomaly maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from calibration.artifact import load_manifest
from calibration.maps import smooth_map
from engines.banks import BANK_PRECISIONS, BankConfig, MemoryBank, image_scores
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


@dataclasses.dataclass(frozen=True)
class Deployment:
    """How a model runs: runtime (onnxruntime | torch | tensorrt), precision (fp32 | fp16 | int8,
    as the runtime allows), device (cpu | cuda | cuda:N), CPU threads, CUDA graphs (torch on CUDA),
    and the precision of the bank's distance products (engines.banks.MemoryBank)."""

    runtime: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    cuda_graphs: bool = False
    bank_precision: str = "fp32"

    def __post_init__(self):
        check_runtime(self.runtime, self.precision)
        if self.bank_precision not in BANK_PRECISIONS:
            raise ConfigError(f"bank precision {self.bank_precision!r}; valid: {', '.join(BANK_PRECISIONS)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"unknown device {self.device!r}; valid: cpu, cuda, cuda:N")
        if self.runtime == "onnxruntime" and self.device != "cpu":
            raise ConfigError("the onnxruntime runtime runs on the CPU here; on a GPU use --runtime tensorrt or torch")
        if self.runtime == "tensorrt" and self.device == "cpu":
            raise ConfigError("the tensorrt runtime needs --device cuda")
        if self.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} asked for, but no CUDA GPU is visible to torch; "
                                  "use --device cpu")


def make_engine(deployment: Deployment, model_dir: Path, embedding: EmbeddingConfig, weights: str | None,
                module: PatchEmbedding | None = None) -> Engine:
    """The patch-embedding engine of a model directory (which must hold model.onnx) for a deployment.

    onnxruntime runs model.onnx (or engines/onnxruntime-int8.onnx); torch runs `module`, or
    rebuilds the network from the config and weights; tensorrt runs the plan built for this GPU.
    """
    d = deployment
    size = embedding.input_size
    if d.runtime == "torch":
        factory = (lambda: module) if module is not None else (lambda: PatchEmbedding(embedding, weights))
        return TorchEngine(factory, size, d.threads, d.device, d.precision, d.cuda_graphs)
    if d.runtime == "tensorrt":
        from engines.tensorrt import TensorRTEngine, plan_path

        return TensorRTEngine(plan_path(model_dir, d.precision), size)
    if d.precision == "int8":
        from calibration.int8 import check_engine

        return OnnxRuntimeEngine(check_engine(model_dir, "onnxruntime", "int8"), size, d.threads)
    return OnnxRuntimeEngine(Path(model_dir) / "model.onnx", size, d.threads)


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

    def __init__(self, model_dir: str | Path, deployment: Deployment = Deployment()):
        self.dir = Path(model_dir)
        self.deployment = deployment
        self.manifest = load_manifest(self.dir)
        self.embedding = EmbeddingConfig(**self.manifest["embedding"])
        self.scoring = ScoringConfig(**self.manifest["scoring"])
        bank_device = deployment.device if deployment.runtime != "onnxruntime" else "cpu"
        self.bank = MemoryBank.load(self.dir / "bank.faiss", BankConfig(**self.manifest["bank"]), bank_device,
                                    deployment.bank_precision)
        self.thresholds = json.loads((self.dir / "thresholds.json").read_text())
        self.engine = make_engine(deployment, self.dir, self.embedding, self.manifest.get("weights"))
        set_threads(deployment.threads)

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

    def score_on_device(self, images: np.ndarray):
        """The whole GPU path (torch runtime on CUDA, flat bank on the same device): preprocessing,
        network, exact bank search and map smoothing stay on the device.

        uint8 [N, S, S, 3] -> (smoothed maps float32 tensor [N, S, S], image scores float32 tensor [N]).
        """
        from calibration.maps import smooth_maps_torch

        features = self.engine.infer_device(images)
        n, h, w, d = features.shape
        dist, _ = self.bank.search_tensor(features.reshape(n * h * w, d), 1)
        patch = dist.reshape(n, h, w)
        return smooth_maps_torch(patch, self.input_size, self.scoring.blur_sigma), patch.reshape(n, -1).amax(1)

    def smooth(self, patch_map: np.ndarray) -> np.ndarray:
        """float32 [h, w] -> float32 [S, S] smoothed anomaly map."""
        return smooth_map(patch_map, self.input_size, self.scoring.blur_sigma)
