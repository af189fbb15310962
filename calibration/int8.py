"""INT8 calibration from the model's own normal training images.

ONNX Runtime: static quantisation of model.onnx (QOperator format, int8 weights, uint8
activations) with a calibration reader that feeds N training images, written to
``<model>/engines/onnxruntime-int8.onnx`` with its settings in ``onnxruntime-int8.json``.
TensorRT INT8 uses the same images through `calibration_batches` (engines/tensorrt.py).

The preprocessing at the head of the graph (Cast, Sub, Mul) and the final projection stay in
float: quantising them cost more in (de)quantisation than it saved. Which ops, which method
and per-channel weights were chosen by measurement (bench/results/int8-*.json).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration.artifact import ArtifactError, load_manifest, sha256
from calibration.dataset import iter_batches, train_images
from engines.errors import ConfigError, MissingExtraError

METHODS = ("minmax", "entropy", "percentile")
QUANTISED_OPS = ("Conv", "Clip", "Add", "AveragePool", "Concat", "Resize", "Transpose")


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """method: activation range calibration; per_channel: per-output-channel weight scales;
    images: how many normal training images calibrate (evenly spread over the sorted list)."""

    method: str = "minmax"
    per_channel: bool = True
    images: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.images < 1:
            raise ConfigError(f"calibration images {self.images} must be at least 1")


def engine_path(model_dir: Path, runtime: str, precision: str) -> Path:
    return Path(model_dir) / "engines" / f"{runtime}-{precision}.onnx"


def calibration_images(model_dir: Path, count: int, data: str | Path | None = None) -> list[Path]:
    """`count` training images of the model, evenly spread over the sorted list (deterministic)."""
    manifest = load_manifest(model_dir)
    source = data or manifest["fit"].get("data")
    if not source:
        raise ArtifactError(f"{model_dir}: the manifest does not say which images it was fitted on; "
                            "pass --data DIR with the normal training images")
    paths = train_images(source)
    picks = np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int)
    return [paths[i] for i in np.unique(picks)]


def calibration_batches(paths: list[Path], size: int, batch: int = 1) -> Iterator[np.ndarray]:
    """uint8 [B, S, S, 3] batches of the calibration images, as the engine sees them."""
    for images, _ in iter_batches(paths, size, batch):
        yield images


def quantize_onnxruntime(model_dir: str | Path, config: Int8Config = Int8Config(), data: str | Path | None = None) -> dict:
    """Write engines/onnxruntime-int8.onnx (+ .json); returns the settings record."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise MissingExtraError("onnxruntime quantization tools are missing; pip install onnxruntime") from None

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    size = manifest["embedding"]["input_size"]
    paths = calibration_images(model_dir, config.images, data)
    batches = list(calibration_batches(paths, size))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"images": batch}

    out = engine_path(model_dir, "onnxruntime", "int8")
    out.parent.mkdir(exist_ok=True)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_dir / "model.onnx"), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QOperator,
                        per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=list(QUANTISED_OPS))
    record = {"runtime": "onnxruntime", "precision": "int8", **dataclasses.asdict(config),
              "quantised_ops": list(QUANTISED_OPS), "format": "QOperator", "weights": "int8", "activations": "uint8",
              "calibration_images": [str(p) for p in paths], "source_sha256": manifest["files"]["model.onnx"],
              "sha256": sha256(out), "seconds": round(time.perf_counter() - start, 2)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def check_engine(model_dir: Path, runtime: str, precision: str) -> Path:
    """The compiled engine file for (runtime, precision), validated against the model it came from."""
    path = engine_path(model_dir, runtime, precision)
    settings = path.with_suffix(".json")
    export = f"lineguard export {model_dir} --runtime {runtime} --precision {precision}"
    if not path.is_file() or not settings.is_file():
        raise ArtifactError(f"{path} not found; build it first with: {export}")
    record = json.loads(settings.read_text())
    manifest = load_manifest(model_dir)
    if record.get("source_sha256") != manifest["files"]["model.onnx"]:
        raise ArtifactError(f"{path} was built from another model.onnx than this model's; rebuild it: {export}")
    if record.get("sha256") != sha256(path):
        raise ArtifactError(f"{path} was altered since it was built; rebuild it: {export}")
    return path
